"""Build README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which cannot be installed here).

Markdown cells are copied as they are; code cells are shown as ```python blocks with their text
outputs, except cells marked `#| hide`; cells marked `#| echo: false` show their output only. Directive lines are stripped.

    python tools/build_readme.py           # write README.md
    python tools/build_readme.py --check   # exit 1 if README.md is out of date
"""
import argparse
import sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter
from nbconvert.preprocessors import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "nbs" / "index.ipynb"
README = ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by tools/build_readme.py: edit the notebook, not this file. -->\n\n"


def _directives(source: str) -> set[str]:
    "nbdev/Quarto directives of a cell: `#| hide` -> 'hide', `#| echo: false` -> 'echo:false'."
    return {ln[2:].replace(" ", "") for ln in source.splitlines() if ln.startswith("#|") and ln[2:].strip()}


class DropNbdevHidden(Preprocessor):
    """Remove `#| hide` cells and the `#|` directive lines of the others."""

    def preprocess(self, nb, resources):
        kept = []
        for cell in nb.cells:
            if cell.cell_type == "code":
                if {"hide", "exporti"} & _directives(cell.source):
                    continue
                hide_source = "echo:false" in _directives(cell.source)
                cell.source = "\n".join(ln for ln in cell.source.splitlines() if not ln.startswith("#|")).strip()
                if hide_source:
                    cell.metadata["transient"] = {"remove_source": True}  # honoured by nbconvert's templates
                cell.outputs = [o for o in cell.outputs if o.get("output_type") in ("stream", "execute_result")]
            kept.append(cell)
        nb.cells = kept
        return nb, resources


def render() -> str:
    nb = nbformat.read(INDEX, as_version=4)
    nb.metadata["language_info"] = {"name": "python"}  # nbdev-clean strips it; code blocks need it
    exporter = MarkdownExporter()
    exporter.register_preprocessor(DropNbdevHidden(), enabled=True)
    body, _ = exporter.from_notebook_node(nb)
    lines = [ln.rstrip() for ln in body.strip().splitlines()]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return HEADER + text + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if README.md differs from the notebook")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = README.read_text() if README.exists() else ""
        if current != text:
            print("README.md is out of date with nbs/index.ipynb: run `python tools/build_readme.py`", file=sys.stderr)
            return 1
        print("README.md agrees with nbs/index.ipynb")
        return 0
    README.write_text(text)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
