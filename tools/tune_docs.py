"""Copy a ``propd tune`` run's tables (OUT/tuning.md) into docs/propd.md, between its tuning markers.

    propd tune --out out/tune && python tools/tune_docs.py out/tune docs
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_block  # noqa: E402

BEGIN, END = "<!-- tuning:begin -->", "<!-- tuning:end -->"


def publish(out: str | Path, docs: str | Path) -> None:
    replace_block(Path(docs) / "propd.md", BEGIN, END, (Path(out) / "tuning.md").read_text())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tools/tune_docs.py OUT_DIR DOCS_DIR")
    publish(sys.argv[1], sys.argv[2])
