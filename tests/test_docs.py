"""The documentation's examples run, and print what the docs say they print.

Conventions for ``docs/*.md`` (written down in docs/concepts.md's closing
section too):

* every ```` ```python ```` block of a page is executed, in page order, in one
  namespace per page, in a fresh working folder (so ``sqlite:///bot.db``
  lands in a temporary folder). A block that needs an event loop runs one
  itself, e.g. ``anyio.run(main)``;
* a ```` ```text output ```` block right after a python block is what that
  block must print, exactly;
* ```` ```python fragment ```` blocks are snippets that cannot run alone (a
  ``yield`` outside a dialog, say); they are only compiled, inside an
  ``async def``, so they at least stay valid Python.
"""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))


@dataclass
class Block:
    kind: str  # "python", "fragment" or "output"
    code: str
    line: int


def blocks(page: Path) -> list[Block]:
    """The page's python, fragment and output blocks, in order."""
    found = []
    for token in MarkdownIt("commonmark").parse(page.read_text()):
        if token.type != "fence":
            continue
        info = token.info.split()
        line = (token.map or [0])[0] + 1
        if info == ["python"]:
            found.append(Block("python", token.content, line))
        elif info == ["python", "fragment"]:
            found.append(Block("fragment", token.content, line))
        elif info == ["text", "output"]:
            found.append(Block("output", token.content, line))
    return found


def test_the_docs_have_pages_with_runnable_examples() -> None:
    runnable = {page.stem for page in PAGES if any(block.kind == "python" for block in blocks(page))}
    assert {"quickstart", "concepts", "time"} <= runnable


@pytest.mark.parametrize("page", PAGES, ids=[page.stem for page in PAGES])
def test_page_examples_run_and_print_what_the_page_shows(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    printed: str | None = None
    for block in blocks(page):
        where = f"{page.name}:{block.line}"
        if block.kind == "fragment":
            compile("async def _fragment():\n" + textwrap.indent(block.code, "    "), where, "exec")
        elif block.kind == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, where, "exec"), namespace)
            printed = out.getvalue()
        else:
            assert printed is not None, f"{where}: an output block must follow a python block"
            assert printed == block.code, f"{where}: the example above printed something else"
            printed = None


def test_the_api_reference_documents_every_public_name() -> None:
    import dynaprompt
    import dynaprompt.testing

    reference = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class|exception):: ([\w.]+)$", reference, re.MULTILINE))
    public = {f"dynaprompt.{name}" for name in dynaprompt.__all__}
    public |= {f"dynaprompt.testing.{name}" for name in dynaprompt.testing.__all__ if name != "ListChannel"}
    assert public - documented == set()
