import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep the suite reproducible and within 2 cores whatever the caller's environment says.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
