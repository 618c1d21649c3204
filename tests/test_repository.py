"""The repository itself: no file committed with a merge's conflict markers in it.

One did (benchmarks/README.md, a whole session long): nothing else reads that file, so nothing failed.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(<{7}|>{7}) |^={7}$", re.MULTILINE)
TEXT = {".py", ".md", ".toml", ".cfg", ".txt", ".yml", ".yaml", ".json", ".ini", ".rst"}


def test_no_file_holds_merge_conflict_markers() -> None:
    files = [
        path
        for path in ROOT.rglob("*")
        if path.is_file()
        and (path.suffix in TEXT or path.parent.name == ".ci")
        and not any(
            (part.startswith(".") and part != ".ci") or part in ("build", "_build")
            for part in path.relative_to(ROOT).parts
        )
    ]
    assert len(files) > 20  # the walk found the project
    marked = [str(path.relative_to(ROOT)) for path in files if MARKER.search(path.read_text(errors="replace"))]
    assert marked == []
