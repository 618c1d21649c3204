"""A channel that prints the bot's messages to a terminal (what ``dynaprompt chat`` uses)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from dynaprompt.models import Message

__all__ = ["ConsoleChannel"]


class ConsoleChannel:
    """Prints each message as ``bot> text`` (later lines of a multi-line text are indented to match).

    Hand-off from the runner is at-least-once; this channel makes it
    exactly-once on its screen by remembering the message ids it has shown
    (``message.id`` is the idempotency key ``<conversation_id>:<seq>``).
    ``seen`` pre-loads ids already on screen, such as the transcript lines
    ``dynaprompt chat`` shows when it resumes a conversation.

    >>> import anyio, io
    >>> from datetime import UTC, datetime
    >>> out = io.StringIO()
    >>> channel = ConsoleChannel(out)
    >>> message = Message(id="c:2", conversation_id="c", text="Hi!\\nHow are you?", at=datetime(2026, 1, 1, tzinfo=UTC))
    >>> anyio.run(channel.deliver, message)
    >>> anyio.run(channel.deliver, message)  # a re-delivery: shown once
    >>> print(out.getvalue(), end="")
    bot> Hi!
         How are you?
    """

    def __init__(self, stream: TextIO | None = None, *, prefix: str = "bot> ", seen: Iterable[str] = ()) -> None:
        self._stream = stream
        self.prefix = prefix
        self.seen: set[str] = set(seen)

    @property
    def stream(self) -> TextIO:
        # Looked up late so a test's or the shell's redirection of sys.stdout is honoured.
        return self._stream if self._stream is not None else sys.stdout

    async def deliver(self, message: Message) -> None:
        if message.id in self.seen:
            return
        self.seen.add(message.id)
        self.show(self.prefix, message.text)

    def show(self, prefix: str, text: str) -> None:
        """Print ``text`` after ``prefix``, indenting continuation lines, and flush (pipes see it at once)."""
        indent = "\n" + " " * len(prefix)
        self.stream.write(prefix + indent.join(text.splitlines() or [""]) + "\n")
        self.stream.flush()
