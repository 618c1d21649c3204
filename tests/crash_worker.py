"""A conversation run in its own process, so tests can SIGKILL it anywhere and resume it in another.

Run by ``tests/test_crash.py`` as ``python tests/crash_worker.py <command> ...``;
importing it (pytest's doctest collection does) only defines things.

``survey``: drives the scripted conversation :data:`SCRIPT` of the dialog
:func:`survey` on a SQLite file, one step at a time on a virtual clock whose
instant is a function of the step (so every process sees the same timeline).
Every kind of write happens: the start, replies, a recorded ``call()`` that
appends a line to a side-effect file, sends, a scheduled ``send(at=...)``, a
wait that times out, a sleep, ``now()``, a sub-dialog, channel hand-offs, and
the lease's acquire and release. Lines on stdout tell the test what happened:

* ``WRITE <n> <label>``: the n-th write to the store (``--count-writes``);
* ``ACK <k> <action> [<text>]``: step ``k`` returned (a ``deliver()`` that returned is acknowledged);
* ``BLOCKED``: the call is running and will not return (``--block-call``);
* ``DONE``: the script finished.

``--kill-at N:before|after`` makes the process SIGKILL itself at its N-th
write: *before* is after the statements ran but before ``COMMIT`` (for a
transaction) or before the statement (a lease update); *after* follows the
commit. ``--resume-from K`` starts at step K in a new process: it first runs
``run_due()`` at step K's instant (what a restarted server does), then repeats
step K unless its effect is already durable (the conversation exists, or
the reply is in the transcript), then goes on.

``colour``: one action on the :func:`colour` dialog (``start``, ``deliver
TEXT``, ``retry``) with the original code or, with ``--changed``, a changed
definition registered under the same name; prints one JSON line saying how it
went.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from dynaprompt import Message, Runner, call, cancel, dialog, finish, now, open_store, send, sleep, wait_for_reply
from dynaprompt.stores.sqlite import SQLiteStore
from dynaprompt.testing import VirtualClock

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
CONVERSATION = "survey-1"
LEASE_SECONDS = 600.0  # long on purpose: resuming must not wait for a dead process's lease to expire


# -- the dialogs ------------------------------------------------------------------


def issue_ticket(side_file: str, name: str) -> str:
    """A side effect the test can count: one line per real execution."""
    _side_effect(side_file, "issue_ticket")
    return f"T-{len(name)}{name[0].upper()}"


def confirm_booking(side_file: str, seats: str) -> str:
    _side_effect(side_file, "confirm_booking")
    return f"booking for {seats}"


def _side_effect(side_file: str, label: str) -> None:
    with open(side_file, "a", encoding="utf-8") as out:
        out.write(f"{label}\t{os.getpid()}\n")
    if os.environ.get("CRASH_BLOCK_CALL") == label:
        print("BLOCKED", flush=True)
        while True:  # the parent kills us here, mid-call
            time.sleep(1)


@dialog(name="crash-yes-no")
def yes_no(question: str):  # type: ignore[no-untyped-def]
    yield send(f"{question} (yes/no)")
    while True:
        answer = yield wait_for_reply()
        if answer.text in ("yes", "no"):
            return answer.text == "yes"
        yield send("Please answer yes or no.")


@dialog(name="crash-survey")
async def survey(side_file: str):  # type: ignore[no-untyped-def]
    yield send("Welcome! What's your name?")
    name = yield wait_for_reply()
    ticket = yield call(issue_ticket, side_file, name.text)
    yield send(f"Hello {name.text}, your ticket is {ticket}.")
    yield send(f"Reminder: ticket {ticket} is ready.", at="in 1 hour")
    yield send("How many seats?")
    seats = yield wait_for_reply(timeout="30 minutes")
    yield send(f"Booked {seats.text} seats." if seats else "One seat, then.")
    yield sleep(timedelta(minutes=30))
    back = yield now()
    yield send(f"Back at {back:%H:%M}. Any wish for the menu?")
    wish = yield wait_for_reply(timeout="20 minutes")
    yield send(f"Noted: {wish.text}." if wish else "Silence, so the chef decides.")
    booking = yield call(confirm_booking, side_file, seats.text if seats else "1")
    yield send(f"Confirmed: {booking}.")
    last_call = yield send("Last call for dessert!", at="in 2 hours")
    dessert = yield yes_no("Dessert?")
    yield cancel(last_call)  # answered: the scheduled nudge must never go out
    yield send("Dessert it is." if dessert else "No dessert.")
    last = yield wait_for_reply()
    yield send(f"Goodbye, {name.text}! ({last.text})")
    yield finish(ticket)


@dataclass(frozen=True)
class Step:
    minutes: int  # the virtual instant of the step: START + minutes
    action: str  # "start", "deliver" or "run_due"
    text: str = ""


SCRIPT = [
    Step(0, "start"),
    Step(1, "deliver", "Ann"),
    Step(2, "deliver", "3"),
    Step(40, "run_due"),  # the sleep ends; the menu question is asked
    Step(65, "run_due"),  # the menu question times out; the scheduled reminder falls due
    Step(66, "deliver", "maybe"),
    Step(67, "deliver", "yes"),
    Step(68, "deliver", "bye"),
]


@dialog(name="crash-colour")
async def colour():  # type: ignore[no-untyped-def]
    yield send("Pick a colour.")
    picked = yield wait_for_reply()
    yield send(f"{picked.text} it is.")
    closing = yield wait_for_reply()
    yield send(f"Bye ({closing.text}).")


def register_changed_colour() -> None:
    """Replace ``crash-colour`` with a definition whose first message differs (a deploy that broke replay)."""

    @dialog(name="crash-colour")
    async def colour_changed():  # type: ignore[no-untyped-def]
        yield send("Pick a colour, please.")
        picked = yield wait_for_reply()
        yield send(f"{picked.text}, noted.")


# -- killing the process at the N-th write ------------------------------------------------


class WriteHook:
    """Counts the store's writes and SIGKILLs this process at one of them."""

    def __init__(self, kill_at: int | None, position: str, report: bool) -> None:
        self.kill_at = kill_at
        self.position = position
        self.report = report
        self.count = 0
        self.operation = ""  # which public method the current transaction belongs to

    def around(self, label: str, position: str) -> None:
        if position == "before":
            self.count += 1
            if self.report:
                print(f"WRITE {self.count} {label}", flush=True)
        if self.count == self.kill_at and position == self.position:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        hook = self
        commit = SQLiteStore._commit

        def hooked_commit(store: SQLiteStore) -> None:
            hook.around(hook.operation, "before")
            commit(store)
            hook.around(hook.operation, "after")

        setattr(SQLiteStore, "_commit", hooked_commit)  # noqa: B010 - patching the class is the point
        for name in ("create", "append"):
            setattr(SQLiteStore, name, _labelled(hook, name, getattr(SQLiteStore, name)))
        for name in ("acquire", "release"):
            setattr(SQLiteStore, name, _counted(hook, name, getattr(SQLiteStore, name)))


def _labelled(hook: WriteHook, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``create``/``append`` commit through ``_commit``; label that write with the events it carries."""

    async def labelled(store: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        kinds = ",".join(event.kind for event in args[1]) or "row"  # create(row, events), append(id, events, ...)
        if name == "append" and getattr(args[2], "release_owner", None):
            kinds += ",release"  # the runner's last append of an advance drops the lease in the same commit
        hook.operation = f"{name}[{kinds}]"
        return await method(store, *args, **kwargs)

    return labelled


def _counted(hook: WriteHook, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """A lease update is one autocommit statement: before it runs, and after."""

    async def counted(store: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        hook.around(name, "before")
        result = await method(store, *args, **kwargs)
        hook.around(name, "after")
        return result

    return counted


# -- a channel that leaves a trace ----------------------------------------------------


class FileChannel:
    """Appends each message handed over (id, text, step, pid) as a JSON line: a crash may repeat one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step = -1

    async def deliver(self, message: Message) -> None:
        line = json.dumps({"id": message.id, "text": message.text, "step": self.step, "pid": os.getpid()})
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")


# -- the commands -----------------------------------------------------------------


async def run_survey(args: argparse.Namespace) -> None:
    workdir = Path(args.dir)
    store = await open_store(f"sqlite:///{workdir / 'crash.db'}")
    clock = VirtualClock(START)
    channel = FileChannel(workdir / "channel.jsonl")
    side_file = str(workdir / "side_effects.txt")
    async with Runner(store, channel, clock=clock, lease_seconds=LEASE_SECONDS) as runner:
        for index in range(args.resume_from, len(SCRIPT)):
            step = SCRIPT[index]
            channel.step = index
            clock.advance(START + timedelta(minutes=step.minutes) - clock.now())
            await runner.run_due()
            resuming = index == args.resume_from  # its effect may be durable already
            if step.action == "start":
                if not (resuming and await store.get(CONVERSATION) is not None):
                    await runner.start(survey, CONVERSATION, side_file)
            elif step.action == "deliver":
                heard = [e.text for e in await runner.transcript(CONVERSATION) if e.direction == "in"]
                if not (resuming and step.text in heard):
                    await runner.deliver(CONVERSATION, step.text)
            else:
                await runner.run_due()
            print(f"ACK {index} {step.action} {step.text}".rstrip(), flush=True)
    await store.close()
    print("DONE", flush=True)


async def run_colour(args: argparse.Namespace) -> None:
    if args.changed:
        register_changed_colour()
    store = await open_store(f"sqlite:///{Path(args.dir) / 'colour.db'}")
    clock = VirtualClock(START)
    channel = FileChannel(Path(args.dir) / "colour_channel.jsonl")
    outcome: dict[str, Any] = {}
    async with Runner(store, channel, clock=clock, lease_seconds=LEASE_SECONDS) as runner:
        try:
            if args.action == "start":
                status = await runner.start(colour, "colour-1")
            elif args.action == "deliver":
                status = await runner.deliver("colour-1", args.text)
            else:
                status = await runner.retry("colour-1")
            outcome["state"] = status.state
        except Exception as exc:  # the test asserts on the type and the message
            outcome["raised"] = type(exc).__name__
            outcome["message"] = str(exc)
            outcome["conversation_id"] = getattr(exc, "conversation_id", None)
            outcome["seq"] = getattr(exc, "seq", None)
    await store.close()
    print(json.dumps(outcome), flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    survey_cmd = commands.add_parser("survey")
    survey_cmd.add_argument("--dir", required=True)
    survey_cmd.add_argument("--resume-from", type=int, default=0)
    survey_cmd.add_argument("--kill-at", default=None, help="N:before or N:after")
    survey_cmd.add_argument("--count-writes", action="store_true")
    colour_cmd = commands.add_parser("colour")
    colour_cmd.add_argument("--dir", required=True)
    colour_cmd.add_argument("--changed", action="store_true")
    colour_cmd.add_argument("action", choices=["start", "deliver", "retry"])
    colour_cmd.add_argument("text", nargs="?", default="")
    args = parser.parse_args(argv)
    if args.command == "survey":
        kill_at, position = None, "before"
        if args.kill_at:
            number, _, position = args.kill_at.partition(":")
            kill_at = int(number)
        WriteHook(kill_at, position, args.count_writes).install()
        anyio.run(run_survey, args)
    else:
        anyio.run(run_colour, args)


if __name__ == "__main__":
    main(sys.argv[1:])
