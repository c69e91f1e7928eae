"""Fail if `nbdev-export` or `nbdev-clean` would change the tree.

Notebooks are the source: transfer3d/*.py must equal what nbdev-export writes, and notebooks must be
committed clean. Compares file contents before and after running both, so it works on a dirty checkout too.

    python tools/check_nbdev_sync.py
"""
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ["nbs", "transfer3d"]


def snapshot() -> dict[str, str]:
    files = {}
    for top in WATCHED:
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts:
                files[str(p.relative_to(ROOT))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def main() -> int:
    bindir = Path(sys.executable).parent
    failed = False
    for tool in ("nbdev-export", "nbdev-clean"):
        before = snapshot()
        exe = bindir / tool
        subprocess.run([str(exe) if exe.exists() else tool], cwd=ROOT, check=True)
        after = snapshot()
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            failed = True
            print(f"{tool} changed {len(changed)} file(s) -- commit its result:", file=sys.stderr)
            for name in changed:
                print(f"  {name}", file=sys.stderr)
        else:
            print(f"{tool}: no change")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
