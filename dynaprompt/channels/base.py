"""The channel protocol: where a runner hands the bot's messages."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from dynaprompt.models import Message

__all__ = ["Channel", "ListChannel"]


@runtime_checkable
class Channel(Protocol):
    """Anything with ``async def deliver(self, message)``.

    Hand-off is at-least-once: after a crash a message may be handed over
    again with the same ``message.id``, so a channel that remembers the ids it
    has seen can make delivery exactly-once. Raising leaves the message (and
    every later one of that conversation) queued; the runner tries again on
    its next pass over due work.
    """

    async def deliver(self, message: Message) -> None: ...


class ListChannel:
    """Keeps every message in ``.messages``; handy in tests and notebooks."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def deliver(self, message: Message) -> None:
        self.messages.append(message)

    def texts(self, conversation_id: str | None = None) -> list[str]:
        """The texts handed over so far, optionally for one conversation."""
        return [m.text for m in self.messages if conversation_id is None or m.conversation_id == conversation_id]
