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
(a message re-handed after a refused webhook appears once). A reader too slow for the hub's
buffer is told so and re-reads the transcript, which keeps its events complete and in log
order. The hub is per process: the stream also re-reads the transcript every
``poll_interval`` seconds, which catches messages another service process sharing the store sent.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anyio

from dynaprompt.channels.base import Channel
from dynaprompt.errors import InvalidInputError
from dynaprompt.http.models import OutboundMessage
from dynaprompt.models import Message, Status, TranscriptEntry
from dynaprompt.runner import Runner

__all__ = ["ConversationStream", "Hub", "ServiceChannel", "Subscription", "UnknownMessageIdError", "collect_turn"]

_turn: contextvars.ContextVar[tuple[str, list[Message]] | None] = contextvars.ContextVar("turn", default=None)


class UnknownMessageIdError(InvalidInputError):
    """``Last-Event-ID`` or ``?after=`` names no message of the conversation."""

    def __init__(self, conversation_id: str, after: str) -> None:
        super().__init__(f"conversation {conversation_id!r} has no message {after!r} to resume after")


class Subscription:
    """One stream's queue of live messages. When it overflows (a reader too slow for ``buffer``
    messages), ``lagging`` is set and the queue dropped: the reader re-reads the transcript, so order
    and completeness never depend on the buffer."""

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        self.queue: deque[Message] = deque()
        self.lagging = False
        self._arrived = anyio.Event()

    def put(self, message: Message) -> None:
        if len(self.queue) >= self.buffer:
            self.queue.clear()
            self.lagging = True
        else:
            self.queue.append(message)
        self._arrived.set()

    async def wait(self) -> None:
        """Return once a message is queued or the queue overflowed."""
        if not self.queue and not self.lagging:
            await self._arrived.wait()
        self._arrived = anyio.Event()


class Hub:
    """In-process fan-out of handed-off messages to the streams of their conversation."""

    def __init__(self, buffer: int = 256) -> None:
        self.buffer = buffer
        self._subscribers: dict[str, set[Subscription]] = {}

    @contextmanager
    def subscribe(self, conversation_id: str) -> Iterator[Subscription]:
        subscription = Subscription(self.buffer)
        subscribers = self._subscribers.setdefault(conversation_id, set())
        subscribers.add(subscription)
        try:
            yield subscription
        finally:
            subscribers.discard(subscription)
            if not subscribers:
                self._subscribers.pop(conversation_id, None)

    def publish(self, message: Message) -> None:
        for subscription in self._subscribers.get(message.conversation_id, ()):
            subscription.put(message)


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
    """One client's stream of one conversation. ``await check()`` first (so a bad id becomes a 4xx
    answer before the response starts), then iterate :meth:`events`."""

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

    async def check(self) -> None:
        """``UnknownConversationError`` or ``UnknownMessageIdError`` now, rather than inside the stream."""
        self._start(await self.runner.transcript(self.conversation_id))

    def _start(self, entries: list[TranscriptEntry]) -> int:
        if self.after is None:
            return 0
        ids = [entry.id for entry in entries]
        if self.after not in ids:
            raise UnknownMessageIdError(self.conversation_id, self.after)
        return ids.index(self.after) + 1

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
        """The SSE text of the stream, chunk by chunk, until the conversation ends or the client leaves.

        The subscription lives inside this generator, so it ends with it however the response ends.
        """
        with self.hub.subscribe(self.conversation_id) as inbox:
            # Subscribed first, read second: a message sent in between is in one of the two, and ids dedupe.
            entries = await self.runner.transcript(self.conversation_id)
            start = self._start(entries)
            self._seen.update(entry.id for entry in entries[:start])
            yield f"retry: {int(self.poll_interval * 1000)}\n\n"
            for message in self._unseen(entries[start:]):
                yield _event(message)
            idle_polls = 0
            while True:
                ended = await self._ended()
                if ended is not None:
                    for message in await self._catch_up():
                        yield _event(message)
                    yield _end(ended)
                    return
                with anyio.move_on_after(self.poll_interval):
                    await inbox.wait()
                if inbox.lagging:
                    inbox.lagging = False
                elif inbox.queue:
                    idle_polls = 0
                    while inbox.queue:
                        received = inbox.queue.popleft()
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
