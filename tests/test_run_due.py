"""run_due() advances the conversations due at once: each once, soonest first, failures and cancellation local;
serve() sleeps until the next wake-up even while some work stays due."""

from __future__ import annotations

import logging
import random
import socket
import subprocess
import sys
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
    dialog,
    open_store,
    send,
    sleep,
    sleep_until,
    wait_for_reply,
)
from dynaprompt.errors import InvalidInputError, StoreUnavailableError
from dynaprompt.events import ReplyReceived
from dynaprompt.stores.base import ConversationRow, RowUpdate
from dynaprompt.stores.memory import MemoryStore
from dynaprompt.testing import VirtualClock

from .conftest import START

pytestmark = pytest.mark.anyio


@dialog(name="tests.run_due:sleeper")
async def sleeper(wake_at: str):
    yield sleep_until(datetime.fromisoformat(wake_at))
    yield send("awake")


async def start_sleepers(runner: Runner, count: int, *, shuffle: bool = False) -> list[str]:
    """``count`` sleepers due one second apart from START + 1 hour; their ids, soonest first."""
    ids = [f"s{i:03d}" for i in range(count)]
    order = list(ids)
    if shuffle:
        random.Random(4).shuffle(order)
    for conversation_id in order:
        wake_at = START + timedelta(hours=1, seconds=int(conversation_id[1:]))
        await runner.start(sleeper, conversation_id, wake_at.isoformat())
    return ids


def awake_by_conversation(channel: ListChannel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in channel.messages:
        if message.text == "awake":
            counts[message.conversation_id] = counts.get(message.conversation_id, 0) + 1
    return counts


class NetworkLikeStore(MemoryStore):
    """Suspends in every claim and load, as a store that talks to a server does, so the conversations of a
    run_due pass really interleave; records the order of the claims."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: list[str] = []

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        self.claims.append(conversation_id)
        await anyio.lowlevel.checkpoint()
        return await super().acquire(conversation_id, owner, until, now, steal_from=steal_from)

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Any]:
        await anyio.lowlevel.checkpoint()
        return await super().load(conversation_id, after_seq)

    async def append(
        self, conversation_id: str, events: list[Any], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        if update.claim is not None:  # a warm conversation claims its lease with its first append
            self.claims.append(conversation_id)
            await anyio.lowlevel.checkpoint()
        return await super().append(conversation_id, events, update, now)


async def test_two_runners_advancing_due_conversations_concurrently_wake_each_once(
    store: Store, clock: VirtualClock
) -> None:
    channel = ListChannel()
    async with (
        Runner(store, channel, clock=clock, due_concurrency=8, due_batch=5) as first,
        Runner(store, channel, clock=clock, due_concurrency=8, due_batch=5) as second,
    ):
        ids = await start_sleepers(first, 40)
        clock.advance(timedelta(hours=2))
        async with anyio.create_task_group() as group:
            group.start_soon(first.run_due)
            group.start_soon(second.run_due)
        assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)
        for conversation_id in ids:
            assert (await first.status(conversation_id)).state == "completed"
            assert len([e for e in await store.load(conversation_id) if e.kind == "sent"]) == 1
        assert await store.due(clock.now(), 100) == []


async def test_the_writes_of_conversations_woken_together_share_sqlite_transactions(
    tmp_path: Any, clock: VirtualClock
) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/shared.db")
    try:
        channel = ListChannel()
        async with Runner(store, channel, clock=clock, due_concurrency=8) as runner:
            ids = await start_sleepers(runner, 40)
            clock.advance(timedelta(hours=2))
            before = store.commits  # type: ignore[attr-defined]
            assert await runner.run_due() == 40
            commits = store.commits - before  # type: ignore[attr-defined]
        assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)
        # One at a time, each wake-up commits twice (the message, with its claim; its hand-off): 80 in all.
        assert commits <= 40 // 8 * 2 + 3
    finally:
        await store.close()


async def test_due_conversations_are_taken_soonest_first(clock: VirtualClock) -> None:
    store = NetworkLikeStore()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, due_concurrency=3, due_batch=4) as runner:
        ids = await start_sleepers(runner, 12, shuffle=True)
        store.claims.clear()
        clock.advance(timedelta(hours=2))
        assert await runner.run_due() == 12
    assert store.claims == ids
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)


async def test_run_due_takes_batch_after_batch_until_nothing_due_is_left(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=cache_size, due_batch=3, due_concurrency=2) as runner:
        ids = await start_sleepers(runner, 10)
        clock.advance(timedelta(hours=1, seconds=6.5))  # the first seven are due, the last three not yet
        assert await runner.run_due() == 7
        assert awake_by_conversation(channel) == dict.fromkeys(ids[:7], 1)
        clock.advance(timedelta(hours=1))
        assert await runner.run_due() == 3
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)


class CountsDueReads(NetworkLikeStore):
    """Records the limit of every due() read."""

    def __init__(self) -> None:
        super().__init__()
        self.limits: list[int] = []

    async def due(self, now: datetime, limit: int) -> list[str]:
        self.limits.append(limit)
        return await super().due(now, limit)


async def test_a_backlog_is_read_a_batch_at_a_time_not_padded_by_all_it_has_seen(clock: VirtualClock) -> None:
    store = CountsDueReads()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=0, due_batch=10, due_concurrency=4) as runner:
        ids = await start_sleepers(runner, 200)
        clock.advance(timedelta(hours=2))
        store.limits.clear()
        assert await runner.run_due() == 200
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)
    # Each read is padded by what the last one found still due (at most the conversations in flight), not by
    # the 200 seen: the limits used to climb to 210.
    assert max(store.limits) <= 10 + 4
    assert len(store.limits) >= 200 // 10


class RefusesAll(ListChannel):
    async def deliver(self, message: Message) -> None:
        raise ConnectionError("the chat service is down")


async def test_a_pass_ends_when_everything_it_reads_stays_due(
    clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Every message is refused, so every conversation a pass advances stays due: reads that find only those
    # must still reach the ones behind them, and the pass must end.
    store = CountsDueReads()
    async with Runner(store, RefusesAll(), clock=clock, cache_size=0, due_batch=3, due_concurrency=2) as runner:
        await start_sleepers(runner, 20)
        clock.advance(timedelta(hours=2))
        with caplog.at_level(logging.CRITICAL, logger="dynaprompt"), anyio.fail_after(5):
            assert await runner.run_due() == 20
        assert len(await store.due(clock.now(), 100)) == 20


class BrokenForOne(NetworkLikeStore):
    """Fails to load one conversation, as a store whose read of it fails would."""

    def __init__(self, broken: str) -> None:
        super().__init__()
        self.broken: str | None = broken

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Any]:
        await anyio.lowlevel.checkpoint()
        if conversation_id == self.broken:
            raise StoreUnavailableError("memory://broken", f"cannot read {conversation_id}")
        return await super().load(conversation_id, after_seq)


async def test_one_failing_conversation_does_not_stop_the_others_woken_with_it(
    clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = BrokenForOne("s004")
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=0, due_concurrency=4, lease_seconds=3600) as runner:
        ids = await start_sleepers(runner, 10)
        clock.advance(timedelta(hours=2))
        with caplog.at_level(logging.ERROR, logger="dynaprompt"):
            assert await runner.run_due() == 10
        assert awake_by_conversation(channel) == {cid: 1 for cid in ids if cid != "s004"}
        assert any("s004" in record.getMessage() for record in caplog.records)
        row = await store.get("s004")
        assert row is not None
        assert row.lease_owner is None  # released at once, not held for the hour
        assert "s004" in await store.due(clock.now(), 10)  # still due: the next pass tries it again
        store.broken = None
        assert await runner.run_due() == 1
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)


class StuckInHandOff(ListChannel):
    """Every hand-off waits until ``unstuck`` is set (by then the conversation's message is durable and its lease
    held); ``stuck`` counts the conversations waiting there."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = 0
        self.all_stuck = anyio.Event()
        self.expected = 0
        self.unstuck = anyio.Event()

    async def deliver(self, message: Message) -> None:
        if not self.unstuck.is_set():
            self.stuck += 1
            if self.stuck == self.expected:
                self.all_stuck.set()
            await self.unstuck.wait()
        await super().deliver(message)


async def test_cancelling_run_due_releases_every_lease_it_holds(clock: VirtualClock) -> None:
    store = NetworkLikeStore()
    channel = StuckInHandOff()
    async with Runner(store, channel, clock=clock, cache_size=0, due_concurrency=4, lease_seconds=3600) as runner:
        ids = await start_sleepers(runner, 10)
        channel.expected = 4
        clock.advance(timedelta(hours=2))
        async with anyio.create_task_group() as group:
            group.start_soon(runner.run_due)
            await channel.all_stuck.wait()  # four conversations being advanced, all ten claimed for the pass
            assert len([row for row in await store.conversations() if row.lease_owner is not None]) == 10
            group.cancel_scope.cancel()
        assert [row.id for row in await store.conversations() if row.lease_owner is not None] == []
        assert channel.messages == []
        channel.unstuck.set()
        assert await runner.run_due() == 10
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)


class ClaimOutlivesItsCaller(MemoryStore):
    """Commits a claim, then suspends before returning it (a batched write whose caller is cancelled after the
    batch committed); ``claimed`` is set then."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.claimed = anyio.Event()

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        row = await super().acquire(conversation_id, owner, until, now, steal_from=steal_from)
        await self._outlive()
        return row

    async def append(
        self, conversation_id: str, events: list[Any], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        row = await super().append(conversation_id, events, update, now)
        if update.claim is not None:  # a warm conversation claims with its first append
            await self._outlive()
        return row

    async def _outlive(self) -> None:
        if self.armed:
            self.claimed.set()
            await anyio.sleep_forever()


async def test_a_claim_that_committed_as_its_fire_was_cancelled_is_released(clock: VirtualClock) -> None:
    store = ClaimOutlivesItsCaller()
    async with Runner(store, ListChannel(), clock=clock, lease_seconds=3600) as runner:
        await start_sleepers(runner, 1)
        clock.advance(timedelta(hours=2))
        store.armed = True
        async with anyio.create_task_group() as group:
            group.start_soon(runner.run_due)
            await store.claimed.wait()
            group.cancel_scope.cancel()
    row = await store.get("s000")
    assert row is not None
    assert row.lease_owner is None  # not left for an hour


class CountsClaims(MemoryStore):
    """Counts lease claims made on their own (``acquire``) and those made with an append."""

    def __init__(self) -> None:
        super().__init__()
        self.acquired: list[str] = []
        self.claimed: list[str] = []

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        self.acquired.append(conversation_id)
        return await super().acquire(conversation_id, owner, until, now, steal_from=steal_from)

    async def append(
        self, conversation_id: str, events: list[Any], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        if update.claim is not None:
            self.claimed.append(conversation_id)
        return await super().append(conversation_id, events, update, now)


async def test_a_cold_wake_up_takes_its_lease_with_its_first_append(clock: VirtualClock) -> None:
    """Replayed from the log (no cache), a due conversation is claimed by the append of what it did, not by a
    write of its own before: two writes a wake-up (that append, then the hand-off's), not three."""
    store = CountsClaims()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=0, due_concurrency=4) as runner:
        ids = await start_sleepers(runner, 6)
        store.acquired.clear()
        store.claimed.clear()
        clock.advance(timedelta(hours=2))
        assert await runner.run_due() == 6
    assert store.acquired == []
    assert sorted(store.claimed) == ids
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)
    assert [row.lease_owner for row in await store.conversations()] == [None] * 6


class CountsReads(MemoryStore):
    """Records each read of logs: ``load`` one by one, ``load_logs`` the ids it was asked for together."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.read_together: list[list[str]] = []

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Any]:
        self.loads.append(conversation_id)
        return await super().load(conversation_id, after_seq)

    async def load_logs(self, conversation_ids: list[str]) -> dict[str, list[Any]]:
        self.read_together.append(list(conversation_ids))
        return {conversation_id: list(self._events.get(conversation_id, [])) for conversation_id in conversation_ids}


async def test_the_logs_of_conversations_woken_together_are_read_together(clock: VirtualClock) -> None:
    store = CountsReads()
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=0, due_concurrency=4) as runner:
        ids = await start_sleepers(runner, 10)
        store.loads.clear()
        clock.advance(timedelta(hours=2))
        assert await runner.run_due() == 10
    assert store.loads == []
    assert sorted(cid for batch in store.read_together for cid in batch) == ids  # each read once
    assert max(len(batch) for batch in store.read_together) == 4  # as many as are advanced at once
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)


class PollsTogether(CountsReads):
    """The first ``due()`` of each of ``readers`` runners returns once all of them have read: they see the same
    due conversations, as runners polling one store at the same moment do."""

    def __init__(self, readers: int) -> None:
        super().__init__()
        self.readers = readers
        self.all_read = anyio.Event()

    async def due(self, now: datetime, limit: int) -> list[str]:
        found = await super().due(now, limit)
        if not self.all_read.is_set():
            self.readers -= 1
            if self.readers == 0:
                self.all_read.set()
            await self.all_read.wait()
        return found


async def test_runners_that_find_the_same_conversations_due_split_them_and_read_each_log_once(
    clock: VirtualClock,
) -> None:
    """Each due conversation is claimed before its log is read, so of two runners that found it due, only the one
    that claimed it reads and replays it (the other does not replay it only to lose the claim)."""
    store = PollsTogether(readers=2)
    channel = ListChannel()
    async with (
        Runner(store, channel, clock=clock, cache_size=0, due_concurrency=4) as first,
        Runner(store, channel, clock=clock, cache_size=0, due_concurrency=4) as second,
    ):
        ids = await start_sleepers(first, 12)
        store.loads.clear()
        clock.advance(timedelta(hours=2))
        woken: list[int] = []

        async def run_due(runner: Runner) -> None:
            woken.append(await runner.run_due())

        async with anyio.create_task_group() as group:
            group.start_soon(run_due, first)
            group.start_soon(run_due, second)
    assert store.all_read.is_set()  # both read the same due ids
    assert sorted(store.loads + [cid for batch in store.read_together for cid in batch]) == ids
    assert sum(woken) == 12
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)
    assert [row.lease_owner for row in await store.conversations()] == [None] * 12


class LogReadHangs(MemoryStore):
    """Reading logs together never returns; ``reading`` is set once a read has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.reading = anyio.Event()

    async def load_logs(self, conversation_ids: list[str]) -> dict[str, list[Any]]:
        if self.armed:
            self.reading.set()
            await anyio.sleep_forever()
        return await super().load_logs(conversation_ids)


async def test_cancelling_run_due_while_it_reads_the_logs_of_what_it_claimed_releases_them_all(
    clock: VirtualClock,
) -> None:
    store = LogReadHangs()
    async with Runner(store, ListChannel(), clock=clock, cache_size=0, due_concurrency=2, lease_seconds=3600) as runner:
        ids = await start_sleepers(runner, 6)
        clock.advance(timedelta(hours=2))
        store.armed = True
        async with anyio.create_task_group() as group:
            group.start_soon(runner.run_due)
            await store.reading.wait()  # two taken by workers, four queued: all six claimed
            assert len([row for row in await store.conversations() if row.lease_owner is not None]) == 6
            group.cancel_scope.cancel()
        assert [row.id for row in await store.conversations() if row.lease_owner is not None] == []
        store.armed = False
        assert await runner.run_due() == 6
    assert sorted(row.id for row in await store.conversations() if row.state == "completed") == ids


class ReplyBeforeClaim(CountsClaims):
    """Before the first claiming append of ``target``, another runner makes a reply durable (as ``deliver`` does
    while it cannot take the lease): the log the claim was made from is stale by then."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target: str | None = target

    async def append(
        self, conversation_id: str, events: list[Any], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        if update.claim is not None and conversation_id == self.target:
            self.target = None
            row = await self.get(conversation_id)
            assert row is not None
            reply = ReplyReceived(seq=row.last_seq + 1, at=now, text="meanwhile")
            await super().append(conversation_id, [reply], RowUpdate(needs_advance=True), now)
        return await super().append(conversation_id, events, update, now)


async def test_a_cold_wake_up_whose_log_moved_before_its_claim_writes_nothing_and_goes_on_leased(
    clock: VirtualClock,
) -> None:
    store = ReplyBeforeClaim("s001")
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=0) as runner:
        ids = await start_sleepers(runner, 3)
        store.acquired.clear()
        clock.advance(timedelta(hours=2))
        assert await runner.run_due() == 3
    assert store.acquired == ["s001"]  # refused claim: the claim-first path took over
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)
    kinds = [event.kind for event in await store.load("s001")]
    assert kinds.count("reply") == 1
    assert kinds.count("sent") == 1
    assert kinds.count("timer_fired") == 1
    row = await store.get("s001")
    assert row is not None
    assert (row.state, row.lease_owner, row.needs_advance) == ("completed", None, False)


def test_due_concurrency_must_be_at_least_one() -> None:
    with pytest.raises(InvalidInputError, match="due_concurrency"):
        Runner(MemoryStore(), due_concurrency=0)


class RefusesOne(ListChannel):
    """Refuses every message of one conversation (a channel that is down for that user)."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused
        self.arrived = anyio.Event()

    async def deliver(self, message: Message) -> None:
        if message.conversation_id == self.refused:
            raise ConnectionError("that user's chat is down")
        await super().deliver(message)
        self.arrived.set()


@dialog(name="tests.run_due:napper")
async def napper(minutes: int):
    yield sleep(timedelta(minutes=minutes))
    yield send("awake")


async def test_work_left_due_does_not_hold_back_the_next_wake_up_of_serve(
    store: Store, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    channel = RefusesOne("refused")
    # A poll interval far beyond the guard: only sleeping until the next wake-up can make serve() fire in time.
    async with Runner(store, channel, clock=clock, poll_interval=3600) as runner:
        await runner.start(napper, "refused", 1)
        await runner.start(napper, "later", 60)
        async with anyio.create_task_group() as group:
            group.start_soon(runner.serve)
            await anyio.wait_all_tasks_blocked()
            with caplog.at_level(logging.CRITICAL, logger="dynaprompt"):
                clock.advance(timedelta(minutes=2))  # "refused" falls due; its message is refused and stays due
                await anyio.wait_all_tasks_blocked()
            assert (await runner.status("refused")).wake_at is not None
            clock.advance(timedelta(hours=1))
            with anyio.fail_after(5):
                await channel.arrived.wait()
            group.cancel_scope.cancel()
    assert [(m.conversation_id, m.text) for m in channel.messages] == [("later", "awake")]


class CountsPasses(Runner):
    passes = 0

    async def run_due(self) -> int:
        self.passes += 1
        return await super().run_due()


@dialog(name="tests.run_due:asks")
async def asks(minutes: int):
    yield send("Still there?")
    reply = yield wait_for_reply(timeout=timedelta(minutes=minutes))
    yield send("Bye." if reply is None else "Hi.")


@pytest.mark.parametrize(("minutes", "extra_passes"), [(120, 0), (30, 1)])
async def test_serve_wakes_early_only_for_a_wake_up_before_the_one_it_sleeps_until(
    clock: VirtualClock, minutes: int, extra_passes: int
) -> None:
    """serve() sleeps until a sleeper's wake-up in an hour. A conversation that then records a timeout in two
    hours does not wake it (its next pass finds that one); one in 30 minutes does, so serve re-plans. Either
    timeout fires on time."""
    store = await open_store("memory://")
    channel = ListChannel()
    async with CountsPasses(store, channel, clock=clock, poll_interval=3600) as runner:
        await start_sleepers(runner, 1)
        async with anyio.create_task_group() as group:
            group.start_soon(runner.serve)
            await anyio.wait_all_tasks_blocked()
            before = runner.passes
            await runner.start(asks, "q1", minutes)
            await anyio.wait_all_tasks_blocked()
            assert runner.passes - before == extra_passes
            for _ in range(2):  # past the sleeper's wake-up and the timeout, whichever comes first
                clock.advance(timedelta(minutes=61))
                await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()
        status = await runner.status("q1")
    assert status.state == "completed"
    assert channel.texts("q1") == ["Still there?", "Bye."]


@pytest.mark.parametrize("pass_interval", [0.0, 0.010])
async def test_serve_fires_wake_ups_close_together_in_one_pass_after_pass_interval(
    clock: VirtualClock, pass_interval: float
) -> None:
    """Sleepers due 0, 2, 4 and 6 ms after an instant T. serve()'s first pass, at T, wakes the first; with a
    pass_interval of 10 ms the next pass is not before T + 10 ms, and it wakes the other three together (never
    one early); with 0, each is woken as soon as it is due."""
    store = await open_store("memory://")
    channel = ListChannel()
    due = START + timedelta(hours=1)
    async with CountsPasses(store, channel, clock=clock, poll_interval=3600, pass_interval=pass_interval) as runner:
        for index in range(4):
            await runner.start(sleeper, f"s{index}", (due + timedelta(milliseconds=2 * index)).isoformat())
        async with anyio.create_task_group() as group:
            group.start_soon(runner.serve)
            await anyio.wait_all_tasks_blocked()
            before = runner.passes
            clock.advance(due - clock.now())
            await anyio.wait_all_tasks_blocked()
            assert [m.conversation_id for m in channel.messages] == ["s0"]
            clock.advance(timedelta(milliseconds=7))  # s1, s2 and s3 are due now
            await anyio.wait_all_tasks_blocked()
            woken_by_7ms = [m.conversation_id for m in channel.messages]
            clock.advance(timedelta(milliseconds=3))  # T + 10 ms
            await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()
    if pass_interval:
        assert woken_by_7ms == ["s0"]
        assert runner.passes - before == 2
    else:
        assert woken_by_7ms == ["s0", "s1", "s2", "s3"]
    assert sorted(m.conversation_id for m in channel.messages) == ["s0", "s1", "s2", "s3"]


async def test_a_negative_pass_interval_is_refused() -> None:
    store = await open_store("memory://")
    with pytest.raises(InvalidInputError, match="pass_interval"):
        Runner(store, pass_interval=-1)


class CountsRowScans(MemoryStore):
    """Counts the reads of every row (conversations()) and of the leased ones (leased())."""

    def __init__(self) -> None:
        super().__init__()
        self.scans = {"conversations": 0, "leased": 0}

    async def conversations(self, state: Any = None) -> list[ConversationRow]:
        self.scans["conversations"] += 1
        return await super().conversations(state)

    async def leased(self) -> list[ConversationRow]:
        self.scans["leased"] += 1
        return await super().leased()


async def test_the_first_pass_takes_over_dead_leases_without_reading_every_row(clock: VirtualClock) -> None:
    store = CountsRowScans()
    channel = ListChannel()
    dead_owner = f"{socket.gethostname()}:{_finished_pid()}:deadbeef"
    async with Runner(store, channel, clock=clock, cache_size=0) as runner:
        ids = await start_sleepers(runner, 30)
        # A process on this host died while advancing s007: its lease would hold the conversation for a day.
        assert await store.acquire("s007", dead_owner, clock.now() + timedelta(days=1), clock.now()) is not None
        clock.advance(timedelta(hours=2))
        assert await runner.run_due() == 30
        assert await runner.run_due() == 0
    assert awake_by_conversation(channel) == dict.fromkeys(ids, 1)
    assert store.scans == {"conversations": 0, "leased": 1}  # the leased rows, once; never every row


def _finished_pid() -> int:
    """The pid of a process of ours that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
