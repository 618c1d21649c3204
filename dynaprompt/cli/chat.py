"""``dynaprompt chat TARGET``: talk to a dialog in the terminal, durably.

Each line typed (or piped) on stdin is delivered to the conversation; the
bot's messages are printed as ``bot> text`` by a
:class:`~dynaprompt.channels.console.ConsoleChannel`. ``Runner.serve()`` runs
alongside the input, so timers fire while the user is idle. Lines starting
with ``-- `` are the command's own notes.

On start, the conversation (``--conversation``, default ``console``) is

* continued if it is live: the last ``--history`` messages are shown, and
  whatever fell due while nothing ran (a wait that timed out, a sleep that
  ended, a scheduled send) happens at once;
* started if it does not exist or its last run has ended (completed, or
  failed because the dialog raised).

A conversation whose log no longer matches the dialog's code (a
``NondeterminismError``: it is parked, its log untouched) is retried against
the current code each time the command starts, so fixing the code resumes it;
while it still diverges the command stops with the error (status 2), unless
``--restart`` is given, which starts a new run (the old one stays in the log).

End of input (Ctrl-D), Ctrl-C and SIGTERM leave with status 0; the
conversation stays where it is, and the same command continues it. When the
conversation completes, the command says so and exits 0 (1 if it failed);
running the command again starts a new run on the same conversation id.
"""

from __future__ import annotations

import argparse
import codecs
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dynaprompt.channels.console import ConsoleChannel
from dynaprompt.dialogs import Dialog
from dynaprompt.errors import ConversationEndedError, DynapromptError, NondeterminismError, UnknownConversationError
from dynaprompt.loading import load_dialog
from dynaprompt.models import Status
from dynaprompt.runner import Runner
from dynaprompt.stores import mask, open_store

__all__ = ["DEFAULT_STORE", "add_parser", "chat", "stdin_lines"]

DEFAULT_STORE = "sqlite:///.dynaprompt/dynaprompt.db"
_ENDED = ("completed", "failed")
# How often the chat looks at the conversation's state, to notice an end that a timer (not a reply) caused.
_WATCH_INTERVAL = 0.25


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat with a dialog in the terminal",
        description="Chat with a dialog in the terminal. The conversation is stored, so you can leave "
        "(Ctrl-D, Ctrl-C, or kill the process) and run the same command again to continue it.",
    )
    parser.add_argument(
        "target",
        help="the dialog: path.py, path.py:name or module:name (without :name, the module's `main` "
        "dialog, else its only dialog)",
    )
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default: {DEFAULT_STORE})")
    parser.add_argument("--conversation", default="console", help="conversation id (default: console)")
    parser.add_argument("--tz", default=None, help="IANA time zone of a new conversation (default: UTC)")
    parser.add_argument(
        "--history", type=int, default=6, help="how many earlier messages to show when resuming (default: 6)"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="if the stored conversation no longer matches the dialog's code, start it again instead of stopping",
    )
    parser.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    """The ``chat`` command: load the dialog, open the store, chat on stdin/stdout."""
    chosen = load_dialog(args.target)
    store = await open_store(args.store)
    try:
        channel = ConsoleChannel()
        async with Runner(store, channel, tz=args.tz) as runner:
            channel.show("-- ", f"store {mask(args.store)}")
            return await chat(
                runner, chosen, args.conversation, channel, stdin_lines(), history=args.history, restart=args.restart
            )
    finally:
        await store.close()


async def chat(
    runner: Runner,
    chosen: Dialog,
    conversation_id: str,
    channel: ConsoleChannel,
    lines: AsyncIterator[str],
    *,
    history: int = 6,
    restart: bool = False,
) -> int:
    """Continue or start ``conversation_id`` and feed it ``lines`` until they end or the conversation does.

    Returns the exit status: 0, or 1 if the conversation failed.
    """
    ended: list[Status] = []
    refused: DynapromptError | None = None

    async with anyio.create_task_group() as group:

        async def converse() -> None:
            async for line in lines:
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                # Shielded: once a line is read, let it become durable and the bot answer before leaving.
                with anyio.CancelScope(shield=True):
                    try:
                        await runner.deliver(conversation_id, text)
                    except ConversationEndedError:
                        pass  # ended by a timer just now; watch_end reports it
                    except NondeterminismError:
                        pass  # the conversation is parked as failed: reported below as its end
                if await _ended(runner, conversation_id, ended):
                    break
            group.cancel_scope.cancel()

        async def watch_end() -> None:
            # Polled: a timer can end the conversation without any message, so there is nothing else to wait on.
            while True:
                await anyio.sleep(_WATCH_INTERVAL)
                if await _ended(runner, conversation_id, ended):
                    group.cancel_scope.cancel()
                    return

        # Signals first, so that a Ctrl-C at any moment from here on leaves cleanly.
        await group.start(_leave_on_signal, group.cancel_scope)
        try:
            with anyio.CancelScope(shield=True):
                status = await _begin(runner, chosen, conversation_id, channel, history, restart)
        except DynapromptError as exc:
            refused = exc  # raised below, outside the task group, so the command reports it plainly
            group.cancel_scope.cancel()
        else:
            if _over(status):
                ended.append(status)
                group.cancel_scope.cancel()
            else:
                group.start_soon(runner.serve)
                group.start_soon(converse)
                group.start_soon(watch_end)

    if refused is not None:
        raise refused
    if ended:
        return _report_end(channel, ended[0])
    channel.show("-- ", f"left conversation {conversation_id!r}; run the same command to continue it")
    return 0


async def _begin(
    runner: Runner, chosen: Dialog, conversation_id: str, channel: ConsoleChannel, history: int, restart: bool
) -> Status:
    """Continue the conversation if it can go on, else start (a new run of) it."""
    try:
        status = await runner.status(conversation_id)
    except UnknownConversationError:
        channel.show("-- ", f"starting {chosen.name} as conversation {conversation_id!r}; Ctrl-D or Ctrl-C leaves")
        return await runner.start(chosen, conversation_id)
    parked = status.state == "failed" and (status.error or "").startswith("NondeterminismError")
    if parked or not _over(status):
        if status.dialog != chosen.name:
            raise DynapromptError(
                f"conversation {conversation_id!r} is running dialog {status.dialog!r}, not {chosen.name!r}; "
                "pass --conversation with another id to chat with this one"
            )
        await _show_history(runner, conversation_id, channel, history)
        if parked:
            channel.show("-- ", "it had diverged from the dialog's code; trying the current code")
        try:
            # Replays against the current code and fires what fell due while nothing ran. retry() rather than
            # run_due(): it also takes over the lease of a chat on this host killed while advancing.
            return await runner.retry(conversation_id)
        except NondeterminismError as exc:
            if not restart:
                raise DynapromptError(
                    f"{exc}. Fix the dialog and run again to continue, or pass --restart to start the conversation "
                    "again (its log is kept)"
                ) from exc
            status = await runner.status(conversation_id)
    why = f"its last run {status.state}" + (f": {status.error}" if status.error else "")
    channel.show("-- ", f"starting conversation {conversation_id!r} again ({why}); Ctrl-D or Ctrl-C leaves")
    return await runner.start(chosen, conversation_id)


async def _show_history(runner: Runner, conversation_id: str, channel: ConsoleChannel, history: int) -> None:
    entries = await runner.transcript(conversation_id)
    shown = entries[-history:] if history > 0 else []
    channel.show("-- ", f"continuing conversation {conversation_id!r}" + (" where it was:" if shown else ""))
    for entry in shown:
        channel.show(channel.prefix if entry.direction == "out" else "you> ", entry.text)
        channel.seen.add(entry.id)  # an undelivered message shown here is not printed twice
    if shown:
        channel.show("-- ", "(end of earlier messages)")


async def _ended(runner: Runner, conversation_id: str, ended: list[Status]) -> bool:
    """True once the conversation has ended and has nothing left to say (no scheduled send still due later)."""
    if not ended:
        status = await runner.status(conversation_id)
        if _over(status):
            ended.append(status)
    return bool(ended)


def _over(status: Status) -> bool:
    return status.state in _ENDED and status.wake_at is None


def _report_end(channel: ConsoleChannel, status: Status) -> int:
    if status.state == "completed":
        result = "" if status.result is None else f" with result {status.result!r}"
        channel.show("-- ", f"conversation {status.conversation_id!r} completed{result}; run again to start over")
        return 0
    channel.show("-- ", f"conversation {status.conversation_id!r} failed: {status.error}")
    return 1


async def _leave_on_signal(scope: anyio.CancelScope, *, task_status: TaskStatus[None]) -> None:
    """Ctrl-C (SIGINT) and SIGTERM end the chat cleanly; nothing is lost, as every write is already durable."""
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                scope.cancel()
                return
    except NotImplementedError:  # pragma: no cover - Windows: Ctrl-C raises KeyboardInterrupt instead
        task_status.started()
        await anyio.sleep_forever()


async def stdin_lines(fd: int = 0) -> AsyncIterator[str]:
    """The lines of file descriptor ``fd`` (stdin), read by a daemon thread so the event loop never blocks.

    A daemon thread reading the raw descriptor (not ``sys.stdin``, whose lock a
    thread would hold) lets the process exit while a read is still pending.
    """
    sender: MemoryObjectSendStream[str]
    receiver: MemoryObjectReceiveStream[str]
    sender, receiver = anyio.create_memory_object_stream[str](0)
    token = anyio.lowlevel.current_token()

    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            while True:
                chunk = os.read(fd, 65536)
                pending += decoder.decode(chunk, final=not chunk)
                *complete, pending = pending.split("\n")
                for line in complete:
                    anyio.from_thread.run(sender.send, line, token=token)
                if not chunk:
                    break
            if pending:
                anyio.from_thread.run(sender.send, pending, token=token)
        except (RuntimeError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the chat has ended (or stdin is unusable): stop reading
        finally:
            try:
                anyio.from_thread.run_sync(sender.close, token=token)
            except Exception:
                pass  # the event loop is gone

    threading.Thread(target=read, name="dynaprompt stdin", daemon=True).start()
    async with receiver:
        async for line in receiver:
            yield line
