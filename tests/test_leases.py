"""Leases are held only while a conversation is advanced, survive long calls, and are freed on cancellation;
serve() rides out a store outage."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from dynaprompt import (
    ListChannel,
    Message,
    Runner,
    Store,
    StoreUnavailableError,
    call,
    dialog,
    send,
    sleep,
    wait_for_reply,
)
from dynaprompt.events import ReplyReceived
from dynaprompt.stores.base import RowUpdate
from dynaprompt.stores.memory import MemoryStore
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

calls: list[str] = []
release_call = anyio.Event()


async def slow_lookup(word: str) -> str:
    calls.append(word)
    await anyio.sleep(0.6)
    return word.upper()


async def blocking_lookup(word: str) -> str:
    calls.append(word)
    await anyio.sleep(3600)  # cancelled long before
    return word  # pragma: no cover


@dialog(name="tests.leases:slow")
async def slow(word: str):
    answer = yield call(slow_lookup, word)
    yield send(f"answer {answer}")
    reply = yield wait_for_reply()
    yield send(f"then {reply.text}")


@dialog(name="tests.leases:stuck")
async def stuck():
    yield send("thinking")
    answer = yield call(blocking_lookup, "x")
    yield send(f"answer {answer}")


async def test_a_long_call_keeps_its_lease_so_no_other_runner_takes_over(store: Store) -> None:
    calls.clear()
    channel = ListChannel()
    async with (
        Runner(store, channel, lease_seconds=0.2) as holder,
        Runner(store, channel, lease_seconds=0.2) as other,
    ):
        async with anyio.create_task_group() as group:
            group.start_soon(holder.start, slow, "c1", "owl")
            await anyio.sleep(0.4)  # twice the lease: without renewal it would have expired
            row = await store.get("c1")
            assert row is not None
            assert row.lease_owner == holder.owner
            await other.run_due()  # must not run the call a second time
        await holder.deliver("c1", "bye")
    assert calls == ["owl"]
    assert channel.texts("c1") == ["answer OWL", "then bye"]


class NetworkLikeStore(MemoryStore):
    """Suspends in every release, as a store that talks to a server does (where cancellation can strike)."""

    async def release(self, conversation_id: str, owner: str, last_seq: int | None) -> bool:
        await anyio.lowlevel.checkpoint()
        return await super().release(conversation_id, owner, last_seq)


async def test_cancelled_advance_releases_its_lease_at_once(clock: VirtualClock) -> None:
    calls.clear()
    store = NetworkLikeStore()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, lease_seconds=3600) as first:
        with anyio.move_on_after(0.3):
            await first.start(stuck, "c2")
    row = await store.get("c2")
    assert row is not None
    assert row.lease_owner is None  # not left for an hour
    assert channel.texts() == ["thinking"]
    assert calls == ["x"]


class FlakyStore(MemoryStore):
    """A memory store whose due-work query fails a few times, as a database that went away would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def due(self, now: datetime, limit: int) -> list[str]:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailableError("memory://flaky", "connection refused")
        return await super().due(now, limit)


class WakingChannel(ListChannel):
    def __init__(self) -> None:
        super().__init__()
        self.awake = anyio.Event()

    async def deliver(self, message: Message) -> None:
        await super().deliver(message)
        if message.text == "awake":
            self.awake.set()


@dialog(name="tests.leases:napper")
async def napper():
    yield send("napping")
    yield sleep(60)
    yield send("awake")


async def test_serve_rides_out_a_store_outage(clock: VirtualClock) -> None:
    store = FlakyStore(failures=0)
    channel = WakingChannel()
    async with Runner(store, channel, clock=clock, poll_interval=0.01) as runner:
        await runner.start(napper, "c3")
        store.failures = 3
        clock.advance(61)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(runner.serve)
                await channel.awake.wait()
                group.cancel_scope.cancel()
    assert channel.texts() == ["napping", "awake"]
    assert store.failures == 0


class ReplyLandsFirst(MemoryStore):
    """Another runner makes a reply durable just before this runner's next bare row rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    async def append(self, conversation_id: str, events: list[Any], update: RowUpdate, now: datetime) -> Any:
        if self.armed and not events:
            self.armed = False
            row = self._rows[conversation_id]
            reply = ReplyReceived(seq=row.last_seq + 1, at=now, text="sneaky", metadata={})
            await super().append(conversation_id, [reply], RowUpdate(needs_advance=True), now)
        return await super().append(conversation_id, events, update, now)


@dialog(name="tests.leases:echo")
async def echo():
    while True:
        reply = yield wait_for_reply()
        yield send(f"echo {reply.text}")


async def test_a_reply_landing_during_a_bare_row_rewrite_is_still_answered(clock: VirtualClock) -> None:
    store = ReplyLandsFirst()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(echo, "e1")
        await store.append("e1", [], RowUpdate(needs_advance=True), clock.now())  # a stale row: rewritten bare
        store.armed = True
        await runner.run_due()
        row = await store.get("e1")
    assert channel.texts() == ["echo sneaky"]
    assert row is not None
    assert row.lease_owner is None
    assert not row.needs_advance


class CountsWrites(MemoryStore):
    """Counts the store's write calls by name."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    async def acquire(self, *args: Any, **kwargs: Any) -> Any:
        self.writes.append("acquire")
        return await super().acquire(*args, **kwargs)

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        self.writes.append("append+claim" if args[2].claim is not None else "append")
        return await super().append(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> bool:
        self.writes.append("release")
        return await super().release(*args, **kwargs)


async def test_a_warm_turn_takes_its_lease_with_its_first_append(clock: VirtualClock) -> None:
    """Two writes a turn, not three: the claim rides on the append of reply and answer."""
    store = CountsWrites()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=16) as runner:  # warm even under CACHE_SIZE=0
        await runner.start(echo, "e1")
        store.writes.clear()
        await runner.deliver("e1", "hi")
        row = await store.get("e1")
    assert store.writes == ["append+claim", "append"]  # reply + send + waiting, then delivered + release
    assert channel.texts() == ["echo hi"]
    assert row is not None
    assert row.lease_owner is None


async def test_a_warm_turn_over_a_moved_log_falls_back_and_records_the_reply_once(
    store: Store, clock: VirtualClock
) -> None:
    """Runner A's cached state is behind (B answered meanwhile): A's claim is refused, nothing of its stale
    advance is written, and it replays and answers on top of B's turn."""
    a_channel, b_channel = ListChannel(), ListChannel()
    async with (
        Runner(store, a_channel, clock=clock) as a,
        Runner(store, b_channel, clock=clock) as b,
    ):
        await a.start(echo, "e1")
        await b.deliver("e1", "one")
        await a.deliver("e1", "two")
        transcript = [(entry.direction, entry.text) for entry in await a.transcript("e1")]
    assert transcript == [("in", "one"), ("out", "echo one"), ("in", "two"), ("out", "echo two")]
    assert (b_channel.texts(), a_channel.texts()) == (["echo one"], ["echo two"])


async def test_a_warm_turn_never_writes_under_a_live_lease_of_another_runner(store: Store, clock: VirtualClock) -> None:
    """While B holds the lease, A's warm claim is refused: A only makes the reply durable and flags it,
    and B (or anyone, once the lease is free) answers it."""
    channel = ListChannel()
    async with Runner(store, channel, clock=clock) as a:
        await a.start(echo, "e1")
        held = await store.acquire("e1", "b", clock.now() + timedelta(minutes=5), clock.now())
        assert held is not None
        await a.deliver("e1", "hi")
        row = await store.get("e1")
        assert row is not None
        assert (row.lease_owner, row.needs_advance, channel.texts()) == ("b", True, [])
        assert [e.kind for e in await store.load("e1", held.last_seq)] == ["reply"]
        await store.release("e1", "b", None)
        await a.run_due()
    assert channel.texts() == ["echo hi"]


@dialog(name="tests.leases:nap")
async def nap():
    yield sleep("1 hour")
    yield send("awake")
    yield wait_for_reply()


async def test_a_warm_timer_wake_up_takes_its_lease_with_its_first_append(clock: VirtualClock) -> None:
    store = CountsWrites()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=16) as runner:
        await runner.start(nap, "n1")
        store.writes.clear()
        clock.advance(3600)
        await runner.run_due()
        row = await store.get("n1")
    assert store.writes == ["append+claim", "append"]  # timer fired + send + waiting, then delivered + release
    assert channel.texts() == ["awake"]
    assert row is not None
    assert (row.lease_owner, row.state) == (None, "waiting_for_reply")


class RepliesMidHandOff:
    """A channel that, while taking a conversation's first message, has another runner deliver a reply to that
    conversation (a user answering at once, the reply reaching another runner process)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.other: Runner | None = None

    async def deliver(self, message: Message) -> None:
        self.messages.append(message)
        if self.other is not None:
            other, self.other = self.other, None
            await other.deliver(message.conversation_id, "meanwhile")


async def test_a_reply_appended_by_another_runner_during_a_hand_off_repeats_no_message(
    store: Store, clock: VirtualClock
) -> None:
    """The reply takes the seq the delivered marks were to have: the marks go after it, so the replay that
    answers the reply does not hand the messages over a second time."""
    channel = RepliesMidHandOff()
    async with (
        Runner(store, channel, clock=clock) as a,
        Runner(store, ListChannel(), clock=clock) as b,
    ):
        await a.start(echo, "e1")
        channel.other = b
        await a.deliver("e1", "hi")
        await a.run_due()
        row = await store.get("e1")
        transcript = [(entry.direction, entry.text) for entry in await a.transcript("e1")]
    assert [message.text for message in channel.messages] == ["echo hi", "echo meanwhile"]
    assert len({message.id for message in channel.messages}) == 2
    assert transcript == [("in", "hi"), ("out", "echo hi"), ("in", "meanwhile"), ("out", "echo meanwhile")]
    assert row is not None
    assert (row.lease_owner, row.needs_advance) == (None, False)
