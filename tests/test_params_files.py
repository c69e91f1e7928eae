"""Every params/*.yaml loads with the params class that will run it (no unknown keys, valid values).

Sweep files (a top-level `grid:` key) are skipped: they are read by the sweep runner, not by one params class.
Which class: a `task:` key or *transfer* in the name -> TransferParams; `mode: vdt` -> VDTParams; `mode: ssl` ->
SSLParams; otherwise (mode dense/partial or none) -> PretrainParams. Nothing is run and no data path is touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"


def _raw(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


FILES = sorted(p for p in PARAMS_DIR.glob("*.yaml") if "grid" not in _raw(p))


def params_class(path: Path, raw: dict):
    "The params class that runs `path` (as the CLI dispatches it)."
    if "task" in raw or "transfer" in path.stem:
        from transfer3d.transfer import TransferParams

        return TransferParams
    mode = raw.get("mode", "dense")
    if mode == "vdt":
        from transfer3d.vdt import VDTParams

        return VDTParams
    if mode == "ssl":
        from transfer3d.ssl import SSLParams

        return SSLParams
    from transfer3d.pretrain import PretrainParams

    assert mode in ("dense", "partial"), f"{path.name}: unknown mode {mode!r}"
    return PretrainParams


def test_enough_params_files():
    assert len(FILES) >= 8, f"expected at least 8 params files in {PARAMS_DIR}, found {[p.name for p in FILES]}"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_params_file_validates(path: Path):
    raw = _raw(path)
    cls = params_class(path, raw)
    p = cls.load(path)  # ParamsError (naming the key) on unknown keys or bad values
    assert isinstance(p, cls)
    # the training settings each runner derives must validate too (vdt/ssl keep extra TrainConfig keys in `trainer`)
    if cls.__name__ in ("VDTParams", "SSLParams"):
        from transfer3d.vdt import train_config

        cfg = train_config(p)
    else:
        cfg = p.train_config()
    assert cfg.steps >= 1 and cfg.out_dir == p.out_dir
    # a file may not rely on keys being dropped: every top-level key it sets is a field of the class
    assert set(raw) <= set(cls.model_fields), f"{path.name}: keys {sorted(set(raw) - set(cls.model_fields))}"


PAPER_FILES = [p for p in FILES if p.name.startswith("paper_")]


@pytest.mark.parametrize("path", PAPER_FILES, ids=[p.name for p in PAPER_FILES])
def test_paper_file_is_documented(path: Path):
    "Paper-scale files say at the top what they reproduce, how to run them, and that compute figures are estimates."
    lines = path.read_text().splitlines()
    n = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    header = "\n".join(lines[:n])
    assert n >= 5, f"{path.name}: no header comment"
    assert "transfer3d " in header or "run_ssl_pretrain" in header, f"{path.name}: no command in the header"
    assert "estimate" in header.lower(), f"{path.name}: compute figures not labelled as an estimate"
