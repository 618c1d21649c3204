"""Bot messages as server-sent events, resumable from a message id.

The service's channel (:class:`ServiceChannel`) publishes every message it is handed to a
:class:`Hub`; a stream subscribes to the hub *before* it reads the transcript, so nothing
sent in between is missed, then emits:

1. the bot messages of the transcript after the client's last seen message id
   (``Last-Event-ID`` header, or ``?after=<message id>``), oldest first;
2. each new bot message as it is handed off, live;
3. ``event: end`` with the conversation's status once it has ended with nothing left to send.

Every message event carries its message id as the SSE ``id``, so a browser's
``EventSource`` resumes on its own after a dropped connection. Events are deduplicated by id
(a message re-handed after a refused webhook appears once). The hub is per process: the
stream also re-reads the transcript every ``poll_interval`` seconds, which catches messages
that another service process sharing the store sent, and anything a slow subscriber dropped.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dynaprompt.channels.base import Channel
from dynaprompt.errors import InvalidInputError
from dynaprompt.http.models import OutboundMessage
from dynaprompt.models import Message, Status, TranscriptEntry
from dynaprompt.runner import Runner

__all__ = ["ConversationStream", "Hub", "ServiceChannel", "UnknownMessageIdError", "collect_turn"]

_turn: contextvars.ContextVar[tuple[str, list[Message]] | None] = contextvars.ContextVar("turn", default=None)


class UnknownMessageIdError(InvalidInputError):
    """``Last-Event-ID`` or ``?after=`` names no message of the conversation."""

    def __init__(self, conversation_id: str, after: str) -> None:
        super().__init__(f"conversation {conversation_id!r} has no message {after!r} to resume after")


class Hub:
    """In-process fan-out of handed-off messages to the streams of their conversation."""

    def __init__(self, buffer: int = 256) -> None:
        self.buffer = buffer
        self._subscribers: dict[str, set[MemoryObjectSendStream[Message]]] = {}

    @contextmanager
    def subscribe(self, conversation_id: str) -> Iterator[MemoryObjectReceiveStream[Message]]:
        sender, receiver = anyio.create_memory_object_stream[Message](self.buffer)
        subscribers = self._subscribers.setdefault(conversation_id, set())
        subscribers.add(sender)
        try:
            yield receiver
        finally:
            subscribers.discard(sender)
            if not subscribers:
                self._subscribers.pop(conversation_id, None)
            sender.close()
            receiver.close()

    def publish(self, message: Message) -> None:
        for sender in list(self._subscribers.get(message.conversation_id, ())):
            try:
                sender.send_nowait(message)
            except anyio.WouldBlock:
                pass  # a slow reader: its stream catches up from the transcript at its next poll


@contextmanager
def collect_turn(conversation_id: str) -> Iterator[list[Message]]:
    """Collect the messages of ``conversation_id`` that this task hands off inside the block.

    ``Runner.start``/``deliver`` hand off in the caller's task, so a request sees the replies
    its own message caused.
    """
    collected: list[Message] = []
    token = _turn.set((conversation_id, collected))
    try:
        yield collected
    finally:
        _turn.reset(token)


class ServiceChannel:
    """The service's channel: tell the hub (streams, turn results), then the downstream channel (webhook).

    A downstream refusal propagates, so the runner keeps the message queued and re-hands it later.
    """

    def __init__(self, hub: Hub, downstream: Channel | None = None) -> None:
        self.hub = hub
        self.downstream = downstream

    async def deliver(self, message: Message) -> None:
        turn = _turn.get()
        if turn is not None and turn[0] == message.conversation_id and all(m.id != message.id for m in turn[1]):
            turn[1].append(message)
        self.hub.publish(message)
        if self.downstream is not None:
            await self.downstream.deliver(message)


def _event(message: OutboundMessage) -> str:
    return f"id: {message.id}\nevent: message\ndata: {message.model_dump_json()}\n\n"


def _end(status: Status) -> str:
    return f"event: end\ndata: {status.model_dump_json()}\n\n"


class ConversationStream:
    """One client's stream of one conversation. ``await open()`` (which validates, so errors become
    4xx answers before the response starts), then iterate :meth:`events`."""

    def __init__(
        self,
        runner: Runner,
        hub: Hub,
        conversation_id: str,
        after: str | None,
        *,
        poll_interval: float = 1.0,
        keepalive: float = 15.0,
    ) -> None:
        self.runner = runner
        self.hub = hub
        self.conversation_id = conversation_id
        self.after = after
        self.poll_interval = poll_interval
        self.keepalive_polls = max(1, round(keepalive / poll_interval))
        self._seen: set[str] = set()
        self._backlog: list[OutboundMessage] = []
        self._exit = ExitStack()
        self._inbox: MemoryObjectReceiveStream[Message] | None = None

    async def open(self) -> None:
        self._inbox = self._exit.enter_context(self.hub.subscribe(self.conversation_id))
        try:
            entries = await self.runner.transcript(self.conversation_id)
            start = 0
            if self.after is not None:
                ids = [entry.id for entry in entries]
                if self.after not in ids:
                    raise UnknownMessageIdError(self.conversation_id, self.after)
                start = ids.index(self.after) + 1
            self._seen.update(entry.id for entry in entries[:start])
            self._backlog = self._unseen(entries[start:])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._exit.close()

    def _unseen(self, entries: list[TranscriptEntry]) -> list[OutboundMessage]:
        fresh: list[OutboundMessage] = []
        for entry in entries:
            if entry.direction == "out" and entry.id not in self._seen:
                self._seen.add(entry.id)
                fresh.append(OutboundMessage.of_entry(self.conversation_id, entry))
        return fresh

    async def _catch_up(self) -> list[OutboundMessage]:
        return self._unseen(await self.runner.transcript(self.conversation_id))

    async def _ended(self) -> Status | None:
        status = await self.runner.status(self.conversation_id)
        return status if status.state in ("completed", "failed") and status.wake_at is None else None

    async def events(self) -> AsyncIterator[str]:
        """The SSE text of the stream, chunk by chunk, until the conversation ends or the client leaves."""
        assert self._inbox is not None, "open() first"
        inbox = self._inbox
        try:
            yield f"retry: {int(self.poll_interval * 1000)}\n\n"
            for message in self._backlog:
                yield _event(message)
            idle_polls = 0
            while True:
                ended = await self._ended()
                if ended is not None:
                    for message in await self._catch_up():
                        yield _event(message)
                    yield _end(ended)
                    return
                received: Message | None = None
                with anyio.move_on_after(self.poll_interval):
                    received = await inbox.receive()
                if received is not None:
                    idle_polls = 0
                    if received.id not in self._seen:
                        self._seen.add(received.id)
                        yield _event(OutboundMessage.of(received))
                    continue
                caught = await self._catch_up()
                for message in caught:
                    yield _event(message)
                idle_polls = 0 if caught else idle_polls + 1
                if idle_polls >= self.keepalive_polls:
                    idle_polls = 0
                    yield ": keepalive\n\n"
        finally:
            self.close()
