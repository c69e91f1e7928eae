"""Run every notebook under nbs/ the way `nbdev-test` does, one pytest item per notebook.

Cells flagged with a `tst_flags` flag (`#| slow`, `#| gpu`) are skipped, as in `nbdev-test`;
`make slow` runs them. Notebooks run in-process with the `IN_TEST` environment variable set.
"""
import tomllib

import pytest
from nbdev import test as nbdev_test  # not `from ... import test_nb`: pytest would collect it

from conftest import ROOT

SKIP_FLAGS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["nbdev"]["tst_flags"].split()
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_notebooks_were_found():
    assert len(NOTEBOOKS) >= 2, "no notebooks found under nbs/"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "nbs")))
def test_notebook(nb):
    ok, seconds = nbdev_test.test_nb(nb, skip_flags=SKIP_FLAGS, showerr=True)
    assert ok, f"{nb.relative_to(ROOT)} failed after {seconds:.1f}s (traceback above, in captured stderr)"
