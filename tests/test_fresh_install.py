"""Build the wheel and install it into a new virtual environment, then use it from outside the repo.

The new environment re-uses the packages already installed here (a .pth file points at this
interpreter's site-packages) so nothing is downloaded; pip still resolves every declared dependency
against them (`pip check`), so a dependency missing from pyproject.toml, or a module missing from
the wheel, fails here.
"""
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile

from conftest import ROOT


def run(*cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_wheel_installs_into_fresh_venv(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ROOT)
    (wheel,) = (tmp_path / "dist").glob("transfer3d-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "transfer3d/cli.py" in names and "transfer3d/core.py" in names and "transfer3d/__main__.py" in names

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    # this interpreter's packages, found *after* the new venv's own (so the wheel wins over an editable install)
    deps = [sysconfig.get_paths()["purelib"]]
    with open(os.path.join(site, "zz_reuse_parent.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --ignore-installed: the editable install of the parent environment must not count as "already satisfied"
    run(py, "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed", wheel, cwd=outside, env=clean_env)
    # every declared dependency is importable metadata-wise in the new environment
    run(py, "-m", "pip", "check", cwd=outside, env=clean_env)

    where = run(py, "-c", "import transfer3d; print(transfer3d.__file__)", cwd=outside, env=clean_env).strip()
    assert where.startswith(str(env)), f"imported {where}, not the installed wheel"
    for cmd in ([env / "bin" / "transfer3d", "--help"], [py, "-m", "transfer3d", "--help"]):
        help_text = run(*cmd, cwd=outside, env=clean_env)
        assert "usage: transfer3d" in help_text and "info" in help_text
