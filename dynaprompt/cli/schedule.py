"""``dynaprompt schedule``, ``dynaprompt schedules`` and ``dynaprompt unschedule``: scheduled conversations.

::

    $ dynaprompt schedule examples/reminders.py ann --every "every weekday at 10:30" --tz Europe/Paris
    sch_3f9a0c1d2e4b
    $ dynaprompt schedules
    ID                DIALOG     CONVERSATION  RECURRENCE              NEXT
    sch_3f9a0c1d2e4b  reminders  ann           every weekday at 10:30  2026-01-06 10:30 CET (Europe/Paris)
    $ dynaprompt unschedule sch_3f9a0c1d2e4b

``schedule`` stores the schedule and prints its id; it fires nothing itself.
Whichever runner serves the store fires it (``dynaprompt serve APP`` with the
same dialog, ``dynaprompt chat``, or your own ``Runner.serve()``); that
process must have the dialog imported, since the store records its name, not
its code. The policies (``--overlap``, ``--missed``, ``--grace``) are stored
with the schedule. Bad input (an ``--at`` in the past, a phrase or zone that is
not understood, a recurrence more frequent than the minimum) prints the reason
and exits with status 2; ``unschedule`` of an unknown id exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dynaprompt.errors import InvalidInputError
from dynaprompt.loading import load_dialog
from dynaprompt.models import Schedule
from dynaprompt.runner import Runner
from dynaprompt.stores import open_store
from dynaprompt.timeparse import parse_duration, zone

__all__ = ["add_parser", "format_table", "list_schedules", "schedule", "unschedule"]

DEFAULT_STORE = "sqlite:///.dynaprompt/dynaprompt.db"


def add_parser(subparsers: Any) -> None:
    """Register ``schedule``, ``schedules`` and ``unschedule``."""
    store_help = f"store URL (default: {DEFAULT_STORE})"
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "schedule",
        help="schedule a conversation, once or recurring",
        description="Schedule a conversation: at --at, every --every, or both (--at is then the first fire). "
        "Prints the schedule id. A runner serving the store (dynaprompt serve, dynaprompt chat, Runner.serve) "
        "fires it, and must have the dialog imported.",
    )
    parser.add_argument("app", help="the dialog: path.py, path.py:name or module:name")
    parser.add_argument("conversation", help="the conversation id each fire starts a run in")
    parser.add_argument(
        "args", nargs="*", help="positional arguments of the dialog, before any option (strings; see --json-args)"
    )
    parser.add_argument("--at", default=None, help="when, once: 'tomorrow at 9am', 'in 20 minutes', an ISO time")
    parser.add_argument(
        "--every", default=None, help="a recurrence: 'every weekday at 10:30', 'every 2 hours', or cron '0 9 * * 1-5'"
    )
    parser.add_argument("--tz", default=None, help="IANA zone of --at, --every and the conversation (default: UTC)")
    parser.add_argument(
        "--kwarg", action="append", default=[], metavar="NAME=VALUE", help="a keyword argument of the dialog (repeat)"
    )
    parser.add_argument("--json-args", action="store_true", help="read each ARG and --kwarg VALUE as JSON")
    parser.add_argument(
        "--overlap", choices=["skip", "queue", "replace"], default="skip",
        help="when the previous run is still live at a fire: skip it (default), queue it, or end the old run",
    )  # fmt: skip
    parser.add_argument(
        "--missed", choices=["run_late", "skip"], default="run_late",
        help="a fire missed while no runner was up: run it once late within --grace (default), or skip it",
    )  # fmt: skip
    parser.add_argument("--grace", default="1 hour", help="how late a missed fire may still run (default: 1 hour)")
    parser.add_argument(
        "--min-interval", default="1 minute", help="refuse recurrences that fire more often (default: 1 minute)"
    )
    parser.add_argument("--store", default=DEFAULT_STORE, help=store_help)
    parser.set_defaults(func=schedule)

    listing: argparse.ArgumentParser = subparsers.add_parser(
        "schedules",
        help="list scheduled conversations",
        description="List scheduled conversations, soonest first, with their next fire time in their own zone.",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    listing.add_argument("--store", default=DEFAULT_STORE, help=store_help)
    listing.set_defaults(func=list_schedules)

    removing: argparse.ArgumentParser = subparsers.add_parser(
        "unschedule",
        help="remove a scheduled conversation",
        description="Remove a schedule; a run it already started goes on. Exits 1 if there is no such schedule.",
    )
    removing.add_argument("id", help="the schedule id (as `dynaprompt schedule` printed it)")
    removing.add_argument("--store", default=DEFAULT_STORE, help=store_help)
    removing.set_defaults(func=unschedule)


async def schedule(args: argparse.Namespace) -> int:
    """The ``schedule`` command: store the schedule, print its id."""
    chosen = load_dialog(args.app)
    positional = [_value(text, args.json_args) for text in args.args]
    keywords: dict[str, Any] = {}
    for pair in args.kwarg:
        name, sep, text = pair.partition("=")
        if not sep or not name.isidentifier():
            raise InvalidInputError(f"--kwarg takes NAME=VALUE, not {pair!r}")
        keywords[name] = _value(text, args.json_args)
    store = await open_store(args.store)
    try:
        async with Runner(
            store,
            schedule_overlap=args.overlap,
            schedule_missed=args.missed,
            schedule_grace=parse_duration(args.grace),
            min_schedule_interval=parse_duration(args.min_interval),
        ) as runner:
            schedule_id = await runner.schedule(
                chosen, args.conversation, *positional, at=args.at, every=args.every, tz=args.tz, **keywords
            )
    finally:
        await store.close()
    print(schedule_id)
    return 0


async def list_schedules(args: argparse.Namespace) -> int:
    """The ``schedules`` command: a table (or JSON) of every schedule."""
    store = await open_store(args.store)
    try:
        async with Runner(store) as runner:
            found = await runner.schedules()
    finally:
        await store.close()
    if args.json:
        print(json.dumps([_as_json(item) for item in found], indent=2))
    elif found:
        print(format_table(found))
    else:
        print("no schedules", file=sys.stderr)
    return 0


async def unschedule(args: argparse.Namespace) -> int:
    """The ``unschedule`` command: remove one schedule; status 1 if it does not exist."""
    store = await open_store(args.store)
    try:
        async with Runner(store) as runner:
            removed = await runner.unschedule(args.id)
    finally:
        await store.close()
    if not removed:
        print(f"dynaprompt: no schedule {args.id!r} (see `dynaprompt schedules`)", file=sys.stderr)
        return 1
    return 0


def format_table(schedules: list[Schedule]) -> str:
    """Schedules as aligned columns: id, dialog, conversation, recurrence, next fire time in the schedule's zone."""
    rows = [("ID", "DIALOG", "CONVERSATION", "RECURRENCE", "NEXT")]
    for item in schedules:
        rows.append((item.id, item.dialog, item.conversation_id, item.every or "once", _next_text(item)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


def _next_text(item: Schedule) -> str:
    if item.next_at is None:
        return "-"
    local = item.next_at.astimezone(zone(item.tz))
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()} ({item.tz})"


def _as_json(item: Schedule) -> dict[str, Any]:
    local_zone = zone(item.tz)
    return {
        "id": item.id,
        "dialog": item.dialog,
        "conversation_id": item.conversation_id,
        "args": item.dialog_args,
        "kwargs": item.dialog_kwargs,
        "tz": item.tz,
        "every": item.every,
        "next_at": None if item.next_at is None else item.next_at.astimezone(local_zone).isoformat(),
        "fired": item.fired,
        "last_fired_at": None if item.last_fired_at is None else item.last_fired_at.astimezone(local_zone).isoformat(),
    }


def _value(text: str, as_json: bool) -> Any:
    if not as_json:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--json-args: {text!r} is not JSON ({exc.msg})") from None
