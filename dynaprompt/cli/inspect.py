"""Operator commands: ``dynaprompt ls``, ``dynaprompt show ID``, ``dynaprompt replay-check APP``.

* ``ls [--state S]``: every conversation with its dialog, state, wake time and last activity;
* ``show ID [--events]``: a conversation's status and transcript, or its raw event log;
* ``replay-check APP``: replay every live (or parked) conversation of the dialogs ``APP`` names
  against the code as it is now, with the pure replay engine (no message is sent, nothing is
  written), and report which would raise ``NondeterminismError``; exit status 1 if any would.
  Run it against a copy of production's store before a deploy.

Output is a table for people (coloured when stdout is a terminal and ``NO_COLOR`` is unset) or,
with ``--json``, one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, get_args

from pydantic import BaseModel

from dynaprompt.dialogs import lookup
from dynaprompt.errors import DynapromptError, NondeterminismError, UnknownConversationError
from dynaprompt.events import Event, Started, event_to_dict
from dynaprompt.loading import load_dialog
from dynaprompt.models import State
from dynaprompt.replay import Execution
from dynaprompt.runner import Runner
from dynaprompt.stores import Store, open_store
from dynaprompt.stores.base import ConversationRow

__all__ = ["ReplayVerdict", "add_parser", "check_conversation", "render_table"]

DEFAULT_STORE = "sqlite:///.dynaprompt/dynaprompt.db"
_COLOURS = {"completed": "32", "failed": "31", "waiting_for_reply": "36", "sleeping": "33", "running": "35"}


def add_parser(subparsers: Any) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default: {DEFAULT_STORE})")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ls = subparsers.add_parser("ls", help="list conversations", description="List conversations.")
    ls.add_argument("--state", choices=get_args(State), help="only conversations in this state")
    common(ls)
    ls.set_defaults(func=run_ls)

    show = subparsers.add_parser("show", help="show one conversation", description="Show a conversation.")
    show.add_argument("conversation_id")
    show.add_argument("--events", action="store_true", help="the raw event log instead of the transcript")
    common(show)
    show.set_defaults(func=run_show)

    check = subparsers.add_parser(
        "replay-check",
        help="check stored conversations against the current code",
        description="Replay every live or parked conversation of the named dialogs against the current code "
        "and report which would raise NondeterminismError (exit status 1 if any would).",
    )
    check.add_argument("app", help="dialogs to check, comma-separated: path.py, path.py:name or module:name")
    common(check)
    check.set_defaults(func=run_replay_check)


# -- rendering ---------------------------------------------------------------


def _use_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _paint(text: str, code: str | None, colour: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if colour and code else text


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, colour: bool = False, codes: dict[str, str] | None = None
) -> str:
    """Rows under headers in aligned columns; a cell's first line only, the last column not padded.

    With ``colour``, a cell whose text is a key of ``codes`` (default: the states) gets that ANSI colour.

    >>> print(render_table(["ID", "STATE"], [["c1", "completed"], ["conversation-2", "failed"]]))
    ID              STATE
    c1              completed
    conversation-2  failed
    """
    cells = [[str(cell).splitlines()[0] if str(cell) else "" for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(row: Sequence[str], codes: Sequence[str | None]) -> str:
        padded = [
            _paint(cell.ljust(widths[i]) if i < len(row) - 1 else cell, codes[i], colour) for i, cell in enumerate(row)
        ]
        return "  ".join(padded).rstrip()

    out = [line(headers, ["1"] * len(headers))]
    for row in cells:
        out.append(line(row, [(codes or _COLOURS).get(cell) for cell in row]))
    return "\n".join(out)


def _out(text: str) -> None:
    """Print a line; when the reader has gone (``| head``), stop quietly with 141, as a SIGPIPE'd tool would."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        raise SystemExit(141) from None


def _dump(value: Any) -> None:
    _out(json.dumps(value, indent=2, ensure_ascii=False))


# -- ls, show ------------------------------------------------------------------


def _summary(row: ConversationRow) -> dict[str, Any]:
    return {
        "conversation_id": row.id,
        "dialog": row.dialog,
        "state": row.state,
        "wake_at": row.wake_at.isoformat() if row.wake_at else None,
        "last_activity_at": row.updated_at.isoformat(),
        "run": row.run,
        "parked": row.parked,
        "error": row.error,
    }


async def run_ls(args: argparse.Namespace) -> int:
    store = await open_store(args.store)
    try:
        rows = sorted(await store.conversations(args.state), key=lambda row: row.updated_at, reverse=True)
    finally:
        await store.close()
    if args.json:
        _dump([_summary(row) for row in rows])
        return 0
    if not rows:
        _out("no conversations" + (f" in state {args.state}" if args.state else ""))
        return 0
    table = [
        [
            row.id, row.dialog, row.state + (" (parked)" if row.parked else ""), _when(row.wake_at),
            _when(row.updated_at), (row.error or "")[:60],
        ]
        for row in rows
    ]  # fmt: skip
    _out(render_table(["ID", "DIALOG", "STATE", "WAKES", "LAST ACTIVITY", "ERROR"], table, colour=_use_colour()))
    return 0


async def run_show(args: argparse.Namespace) -> int:
    store = await open_store(args.store)
    try:
        row = await store.get(args.conversation_id)
        if row is None:
            raise UnknownConversationError(args.conversation_id)
        if args.events:
            events = await store.load(args.conversation_id)
        else:
            async with Runner(store) as runner:
                transcript = await runner.transcript(args.conversation_id)
    finally:
        await store.close()
    if args.json:
        if args.events:
            _dump({"conversation": _summary(row), "events": [event_to_dict(e) for e in events]})
        else:
            _dump({"conversation": _summary(row), "transcript": [e.model_dump(mode="json") for e in transcript]})
        return 0
    colour = _use_colour()
    state = _paint(row.state, _COLOURS.get(row.state), colour) + (" (parked)" if row.parked else "")
    _out(f"{row.id}  dialog {row.dialog}  run {row.run}  {state}  wakes {_when(row.wake_at)}")
    if row.error:
        _out(_paint(f"error: {row.error}", "31", colour))
    _out("")
    if args.events:
        rows = [[str(e.seq), _when(e.at), e.kind, _details(e)] for e in events]
        _out(render_table(["SEQ", "AT", "KIND", "DETAILS"], rows, colour=colour))
        return 0
    for entry in transcript:
        who = _paint("bot ", "36", colour) if entry.direction == "out" else _paint("user", "33", colour)
        lines = entry.text.splitlines() or [""]
        _out(f"{_when(entry.at)}  {who}  {lines[0]}")
        for more in lines[1:]:
            _out(" " * (len(_when(entry.at)) + 8) + more)
    return 0


def _details(event: Event) -> str:
    fields = event_to_dict(event)
    for name in ("seq", "at", "kind"):
        fields.pop(name, None)
    return json.dumps({k: v for k, v in fields.items() if v not in (None, [], {})}, ensure_ascii=False)


# -- replay-check ----------------------------------------------------------------


class ReplayVerdict(BaseModel):
    """What replaying one stored conversation against the current code found.

    ``verdict`` is ``ok`` (replays cleanly), ``diverges`` (would raise ``NondeterminismError``:
    ``seq``, ``recorded`` and ``yielded`` say where and how), or ``error`` (could not be replayed
    at all, e.g. its dialog is not registered).
    """

    conversation_id: str
    dialog: str
    state: str
    verdict: str
    detail: str | None = None
    seq: int | None = None
    recorded: str | None = None
    yielded: str | None = None


async def check_conversation(row: ConversationRow, events: list[Event]) -> ReplayVerdict:
    """Replay ``events`` (one conversation's log) against the registered code, with no I/O.

    Time stands at the last recorded event, so no timer fires that had not fired already; a
    ``call()`` past the end of the log is not run (replay stops there).
    """
    base = {"conversation_id": row.id, "dialog": row.dialog, "state": row.state}
    start_at = max((i for i, e in enumerate(events) if isinstance(e, Started)), default=None)
    if start_at is None:
        return ReplayVerdict(**base, verdict="error", detail="the log has no started event")
    started = events[start_at]
    assert isinstance(started, Started)
    try:
        execution = Execution.begin(row.id, lookup(started.dialog), started, events[:start_at])
    except DynapromptError as exc:
        return ReplayVerdict(**base, verdict="error", detail=str(exc))
    try:
        execution.extend(events[start_at + 1 :])
        await execution.advance(events[-1].at)
    except NondeterminismError as exc:
        return ReplayVerdict(
            **base, verdict="diverges", detail=str(exc), seq=exc.seq, recorded=exc.recorded, yielded=exc.yielded
        )
    except Exception as exc:
        return ReplayVerdict(**base, verdict="error", detail=f"{type(exc).__name__}: {exc}")
    finally:
        await execution.close()
    return ReplayVerdict(**base, verdict="ok")


async def replay_check(store: Store, dialog_names: set[str]) -> list[ReplayVerdict]:
    """Check every live or parked conversation of ``dialog_names`` in ``store``."""
    verdicts = []
    for row in await store.conversations():
        if row.dialog in dialog_names and (row.state not in ("completed", "failed") or row.parked):
            verdicts.append(await check_conversation(row, await store.load(row.id)))
    return verdicts


async def run_replay_check(args: argparse.Namespace) -> int:
    names = {load_dialog(target.strip()).name for target in args.app.split(",") if target.strip()}
    store = await open_store(args.store)
    try:
        verdicts = await replay_check(store, names)
    finally:
        await store.close()
    diverging = [v for v in verdicts if v.verdict == "diverges"]
    if args.json:
        _dump(
            {"checked": len(verdicts), "diverging": len(diverging), "conversations": [v.model_dump() for v in verdicts]}
        )
        return 1 if diverging else 0
    colour = _use_colour()
    if verdicts:
        paint = {"ok": "32", "diverges": "31", "error": "33"}
        rows = [[v.conversation_id, v.dialog, v.state, v.verdict, v.detail or ""] for v in verdicts]
        _out(render_table(["ID", "DIALOG", "STATE", "VERDICT", "DETAIL"], rows, colour=colour, codes=paint))
    names_text = ", ".join(sorted(names))
    _out(f"{len(verdicts)} live conversation(s) of {names_text} checked; {len(diverging)} would diverge")
    return 1 if diverging else 0
