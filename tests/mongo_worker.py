"""Runner processes on a MongoDB database, for the tests that SIGKILL them or run three at once.

Run by ``tests/test_mongo_processes.py`` as ``python tests/mongo_worker.py <command> ...``
(``tests/`` on ``PYTHONPATH``); importing it (pytest's doctest collection does) only defines things.

``survey --url URL --dir DIR``: ``crash_worker``'s scripted survey conversation, on MongoDB. The
store's collections are wrapped so that every driver write (an ``insert_many`` of events, the
conversation document's update, a lease's compare-and-set) is counted: ``--count-writes``
prints ``WRITE <n> <collection>.<method>[<event kinds>]``, and ``--kill-at N:before|after``
SIGKILLs the process just before the N-th write is sent or just after the server acknowledged
it. ``--resume-from K`` goes on from step K as ``crash_worker`` does.

``runner --url URL --name NAME``: one long-lived runner (``serve()`` in the background, real
clock) that reads commands from stdin and answers on stdout:

* ``start <cid> <turns>`` -> ``STARTED <cid>`` (the :func:`echo` dialog);
* ``deliver <cid> <text>`` -> ``ACK <cid> <text>`` once ``deliver()`` returned, or
  ``ERR <cid> <text> <error type>``; deliveries run concurrently;
* ``quit`` -> waits for the deliveries in flight, ``BYE``, exits 0.

With ``MONGO_WORKER_BLOCK=1`` in its environment the runner blocks inside the ``call()`` every
turn of :func:`echo` makes (printing ``BLOCKED <text>``), holding the conversation's lease until
the test kills it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio

from dynaprompt import Runner, call, dialog, open_store, send, wait_for_reply
from dynaprompt.stores.mongo import MongoStore
from dynaprompt.testing import VirtualClock

_PRINTING = threading.Lock()
WRITE_METHODS = ("insert_one", "insert_many", "update_one", "find_one_and_update", "delete_one")


# -- the echo dialog of the many-runner tests ----------------------------------------------


def checkpoint(text: str) -> str:
    """The side effect of each turn; blocks forever in a runner started with MONGO_WORKER_BLOCK=1."""
    if os.environ.get("MONGO_WORKER_BLOCK") == "1":
        # Calls run in worker threads at once: print() writes the text and the newline separately, so two
        # threads could interleave them into one line. One write of the whole line, under a lock, cannot.
        with _PRINTING:
            sys.stdout.write(f"BLOCKED {text}\n")
            sys.stdout.flush()
        while True:  # the parent SIGKILLs us here, holding the lease
            time.sleep(1)
    return text.upper()


@dialog(name="mongo-echo")
async def echo(turns: int):  # type: ignore[no-untyped-def]
    yield send("ready")
    for _ in range(turns):
        reply = yield wait_for_reply()
        loud = yield call(checkpoint, reply.text)
        yield send(f"got {reply.text} ({loud})")


# -- killing the process at the N-th driver write ----------------------------------------


class WriteCounter:
    """Counts writes through wrapped collections and SIGKILLs the process at one of them."""

    def __init__(self, kill_at: int | None, position: str, report: bool) -> None:
        self.kill_at = kill_at
        self.position = position
        self.report = report
        self.count = 0

    def around(self, label: str, position: str) -> None:
        if position == "before":
            self.count += 1
            if self.report:
                print(f"WRITE {self.count} {label}", flush=True)
        if self.count == self.kill_at and position == self.position:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, store: MongoStore) -> None:
        for attribute in ("_events", "_rows", "_rows_unjournaled", "_schedules"):
            setattr(store, attribute, CountedCollection(getattr(store, attribute), self))


class CountedCollection:
    """A real collection whose write methods report to a :class:`WriteCounter` around the real call."""

    def __init__(self, collection: Any, counter: WriteCounter) -> None:
        self._collection = collection
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._collection, name)
        if name not in WRITE_METHODS:
            return method
        counter = self._counter

        async def counted(*args: Any, **kwargs: Any) -> Any:
            label = f"{self._collection.name}.{name}"
            if name == "insert_many":
                label += "[" + ",".join(doc["kind"] for doc in args[0]) + "]"
            counter.around(label, "before")
            result = await method(*args, **kwargs)
            counter.around(label, "after")
            return result

        return counted


# -- the commands ---------------------------------------------------------------------


async def run_survey(args: argparse.Namespace) -> None:
    import crash_worker  # tests/ is on PYTHONPATH: the same dialogs and script as the SQLite crash tests

    workdir = Path(args.dir)
    store = await open_store(args.url)
    assert isinstance(store, MongoStore)
    counter = WriteCounter(args.kill_at, args.position, args.count_writes)
    counter.install(store)
    clock = VirtualClock(crash_worker.START)
    channel = crash_worker.FileChannel(workdir / "channel.jsonl")
    side_file = str(workdir / "side_effects.txt")
    conversation = crash_worker.CONVERSATION
    async with Runner(store, channel, clock=clock, lease_seconds=crash_worker.LEASE_SECONDS) as runner:
        for index in range(args.resume_from, len(crash_worker.SCRIPT)):
            step = crash_worker.SCRIPT[index]
            channel.step = index
            clock.advance(crash_worker.START + timedelta(minutes=step.minutes) - clock.now())
            await runner.run_due()
            resuming = index == args.resume_from  # its effect may be durable already
            if step.action == "start":
                if not (resuming and await store.get(conversation) is not None):
                    await runner.start(crash_worker.survey, conversation, side_file)
            elif step.action == "deliver":
                heard = [e.text for e in await runner.transcript(conversation) if e.direction == "in"]
                if not (resuming and step.text in heard):
                    await runner.deliver(conversation, step.text)
            else:
                await runner.run_due()
            print(f"ACK {index} {step.action} {step.text}".rstrip(), flush=True)
    await store.close()
    print("DONE", flush=True)


async def run_runner(args: argparse.Namespace) -> None:
    from crash_worker import FileChannel  # the same trace file format as the SQLite crash tests

    store = await open_store(args.url, server_selection_timeout=5.0)
    channel = FileChannel(Path(args.dir) / f"channel-{args.name}.jsonl")
    async with Runner(store, channel, lease_seconds=args.lease_seconds, poll_interval=args.poll_interval) as runner:
        async with anyio.create_task_group() as serving:
            serving.start_soon(runner.serve)
            async with anyio.create_task_group() as commands:
                while True:
                    line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                    words = line.strip().split(maxsplit=2)
                    if not words or words[0] == "quit":
                        break
                    if words[0] == "start":
                        await runner.start(echo, words[1], int(words[2]))
                        print(f"STARTED {words[1]}", flush=True)
                    elif words[0] == "deliver":
                        commands.start_soon(deliver, runner, words[1], words[2])
            serving.cancel_scope.cancel()
    await store.close()
    print("BYE", flush=True)


async def deliver(runner: Runner, conversation_id: str, text: str) -> None:
    try:
        await runner.deliver(conversation_id, text)
    except Exception as exc:  # the test counts these; a runner must not die of one
        print(f"ERR {conversation_id} {text} {type(exc).__name__}: {exc}", flush=True)
    else:
        print(f"ACK {conversation_id} {text}", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    survey_cmd = commands.add_parser("survey")
    survey_cmd.add_argument("--url", required=True)
    survey_cmd.add_argument("--dir", required=True)
    survey_cmd.add_argument("--resume-from", type=int, default=0)
    survey_cmd.add_argument("--kill-at", default=None, help="N:before or N:after")
    survey_cmd.add_argument("--count-writes", action="store_true")
    runner_cmd = commands.add_parser("runner")
    runner_cmd.add_argument("--url", required=True)
    runner_cmd.add_argument("--dir", required=True)
    runner_cmd.add_argument("--name", required=True)
    runner_cmd.add_argument("--lease-seconds", type=float, default=30.0)
    runner_cmd.add_argument("--poll-interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.command == "survey":
        number, _, args.position = (args.kill_at or ":before").partition(":")
        args.kill_at = int(number) if number else None
        anyio.run(run_survey, args)
    else:
        anyio.run(run_runner, args)


if __name__ == "__main__":
    main(sys.argv[1:])
