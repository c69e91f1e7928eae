# Task runner. The two commands of README.md: `make demo` (main job) and `make test` (whole suite).
# Each installs what it needs into .venv first, so both work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,dist,viz
# torch is installed on its own first: `pip install torch==2.13.0` takes the local CPU wheel, while a bare
# requirement with no torch installed would pull several GB of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: install demo test slow export bench browser-deps help

help:
	@echo "make demo    install, then run the main job on built-in synthetic data"
	@echo "make test    install, then run the whole test suite (what CI runs)"
	@echo "make export  notebooks -> transfer3d/*.py, clean notebooks, rebuild README.md"
	@echo "make slow    run the notebooks' #| slow cells too"
	@echo "make bench   run benchmarks/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# The main job: synthetic atlas -> pre-training -> transfer sweep (scratch vs fine-tuned, n = 1, 2, 4, 2 seeds)
# -> executed report with the learning curve, all in $(DEMO) (a rerun skips what is done).
DEMO ?= runs/demo
demo: install
	$(BIN)/transfer3d demo --out $(DEMO)

# The browser test drives Debian's chromium (never a browser downloaded by Playwright).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: install browser-deps
	$(BIN)/python tools/check_nbdev_sync.py
	$(BIN)/python tools/build_readme.py --check
	$(BIN)/python -m pytest

export: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(BIN)/python tools/build_readme.py

slow: install
	$(BIN)/nbdev-test --flags slow

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only
