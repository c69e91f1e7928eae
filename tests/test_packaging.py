"""The project's metadata agrees with itself: pyproject vs environment.yml, README vs index.ipynb, nbdev config."""
import re
import subprocess
import sys
import tomllib

import yaml

from conftest import ROOT

CONDA_TO_PYPI = {"pytorch": "torch", "python-build": "build"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_mirrors_pyproject():
    project = _pyproject()["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra}

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    have = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            have |= {_name(r) for r in dep["pip"] if not r.startswith("-e")}
        elif _name(dep) not in ("python", "pip"):
            have.add(CONDA_TO_PYPI.get(_name(dep), _name(dep)))
    assert have == wanted, f"only in environment.yml: {sorted(have - wanted)}; only in pyproject: {sorted(wanted - have)}"


def test_nbdev_config_lives_in_pyproject():
    cfg = _pyproject()["tool"]["nbdev"]
    assert cfg["allowed_cell_metadata_keys"] == ["tags"], "nbdev-clean would delete papermill's `parameters` tag"
    assert {"slow", "gpu"} <= set(cfg["tst_flags"].split())
    assert not (ROOT / "settings.ini").exists(), "nbdev 3 reads [tool.nbdev]; settings.ini would be ignored"


def test_readme_is_built_from_index_notebook():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "build_readme.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_readme_states_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert re.search(r"^\s*make test\s*$", ci, re.M), ".ci/run must call exactly the README test command"


def test_version_is_single_sourced():
    import transfer3d

    init = (ROOT / "transfer3d" / "__init__.py").read_text()
    assert f'__version__ = "{transfer3d.__version__}"' in init
    assert _pyproject()["project"]["dynamic"] == ["version"]
