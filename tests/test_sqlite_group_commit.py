"""SQLite group commit: writes from concurrent tasks share one COMMIT, each still succeeds or fails on its own.

The concurrent-writers races of the conformance suite (one winner among eight) run inside one batch too;
these tests add what only SQLite promises: how many transactions ran, that a batch is durable as a whole
(another connection sees it), and that a broken database surfaces as ``StoreUnavailableError``.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from dynaprompt import Runner, dialog, open_store, send, wait_for_reply
from dynaprompt.errors import ConflictError, DynapromptError, StoreUnavailableError
from dynaprompt.events import Sent, Started
from dynaprompt.stores.base import ConversationRow, RowUpdate
from dynaprompt.stores.sqlite import SQLiteStore
from dynaprompt.testing import ListChannel, VirtualClock

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _row(conversation_id: str) -> ConversationRow:
    return ConversationRow(id=conversation_id, dialog="m:bot", updated_at=T0, last_seq=1)


async def _sqlite(tmp_path: Path) -> SQLiteStore:
    store = await open_store(f"sqlite:///{tmp_path}/bot.db")
    assert isinstance(store, SQLiteStore)
    return store


@dialog(name="group-commit:echo")
def echo() -> Any:
    yield send("Say something.")
    while True:
        reply = yield wait_for_reply()
        yield send(f"You said {reply.text}.")


async def test_concurrent_deliveries_share_commits_and_every_reply_is_in_the_file(
    tmp_path: Path, clock: VirtualClock, channel: ListChannel
) -> None:
    store = await _sqlite(tmp_path)
    ids = [f"user-{i}" for i in range(20)]
    async with Runner(store, channel, clock=clock) as runner:
        for cid in ids:
            await runner.start(echo, cid)
        before = store.commits
        async with anyio.create_task_group() as group:
            for cid in ids:
                group.start_soon(runner.deliver, cid, f"hello from {cid}")
        transactions = store.commits - before
    await store.close()
    # 20 deliveries are 60 writes (lease claim, reply + send + wait, delivered marks + release): far fewer COMMITs.
    assert 1 <= transactions <= 6, transactions
    seen = sqlite3.connect(f"{tmp_path}/bot.db")
    replies = dict(seen.execute("SELECT conversation_id, body FROM events WHERE body LIKE '%\"reply\"%'").fetchall())
    seen.close()
    assert sorted(replies) == sorted(ids)
    assert all(f"hello from {cid}" in body for cid, body in replies.items())
    assert sorted(m.text for m in channel.messages if m.text.startswith("You said")) == sorted(
        f"You said hello from {cid}." for cid in ids
    )


async def test_a_duplicate_append_in_a_batch_fails_alone(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path)
    for cid in ("a", "b"):
        await store.create(_row(cid), [Started(seq=1, at=T0, dialog="m:bot")])
    outcomes: dict[str, str] = {}

    async def append(label: str, cid: str) -> None:
        try:
            await store.append(cid, [Sent(seq=2, at=T0, text=label)], RowUpdate(error=label), T0)
        except ConflictError as exc:
            outcomes[label] = f"conflict at {exc.seq}"
        else:
            outcomes[label] = "written"

    before = store.commits
    async with anyio.create_task_group() as group:
        group.start_soon(append, "first to a", "a")
        group.start_soon(append, "second to a", "a")
        group.start_soon(append, "only to b", "b")
    assert store.commits - before == 1  # one transaction for the three
    assert outcomes == {"first to a": "written", "second to a": "conflict at 2", "only to b": "written"}
    row_a = await store.get("a")
    assert row_a is not None
    assert row_a.error == "first to a"  # the loser's row update was rolled back with its insert
    assert [getattr(e, "text", None) for e in await store.load("b")] == [None, "only to b"]
    await store.close()


async def test_an_append_failing_after_its_compare_and_set_undoes_the_batch_and_each_write_runs_alone(
    tmp_path: Path,
) -> None:
    """Appends in a batch run without savepoints: their row update is a compare-and-set on ``last_seq`` and
    every write of events moves it, so a hit cannot meet a taken seq. A file where that does not hold (an
    event row with no row update: another program's write, a damaged file) makes an insert fail after its
    update: the batch is rolled back and each write runs alone, so only that append fails, wholly."""
    store = await _sqlite(tmp_path)
    for cid in ("a", "b", "c"):
        await store.create(_row(cid), [Started(seq=1, at=T0, dialog="m:bot")])
    stray = sqlite3.connect(f"{tmp_path}/bot.db", isolation_level=None)
    stray.execute("INSERT INTO events VALUES ('b', 3, ?)", (Sent(seq=3, at=T0, text="stray").model_dump_json(),))
    stray.close()
    outcomes: dict[str, str] = {}

    async def append(cid: str) -> None:
        events = [Sent(seq=2, at=T0, text=f"to {cid}"), Sent(seq=3, at=T0, text=f"more to {cid}")]
        try:
            await store.append(cid, events, RowUpdate(error=cid), T0)
        except ConflictError as exc:
            outcomes[cid] = f"conflict at {exc.seq}"
        else:
            outcomes[cid] = "written"

    async with anyio.create_task_group() as group:
        for cid in ("a", "b", "c"):
            group.start_soon(append, cid)
    assert outcomes == {"a": "written", "b": "conflict at 2", "c": "written"}
    row_b = await store.get("b")
    assert row_b is not None
    assert (row_b.last_seq, row_b.error) == (1, None)  # its row update was undone with its first insert
    seen = sqlite3.connect(f"{tmp_path}/bot.db")
    bodies = dict(seen.execute("SELECT conversation_id || seq, body FROM events WHERE seq > 1").fetchall())
    seen.close()
    assert sorted(bodies) == ["a2", "a3", "b3", "c2", "c3"]
    assert "to b" not in bodies["b3"]
    for cid in ("a", "c"):
        row = await store.get(cid)
        assert row is not None
        assert (row.last_seq, row.error) == (3, cid)
    await store.close()


async def test_a_lone_write_commits_on_its_own(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path)
    before = store.commits
    await store.create(_row("solo"), [Started(seq=1, at=T0, dialog="m:bot")])
    assert await store.acquire("solo", "me", T0.replace(hour=10), T0) is not None
    assert await store.release("solo", "me", None)
    assert store.commits - before == 3
    await store.close()


async def test_a_broken_database_raises_store_unavailable_and_commits_nothing(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path)
    await store.create(_row("c"), [Started(seq=1, at=T0, dialog="m:bot")])
    other = sqlite3.connect(f"{tmp_path}/bot.db", isolation_level=None)
    other.execute("DROP TABLE events")
    other.close()
    with pytest.raises(StoreUnavailableError, match="no such table: events") as raised:
        await store.append("c", [Sent(seq=2, at=T0, text="lost")], RowUpdate(error="changed"), T0)
    assert isinstance(raised.value, DynapromptError)
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    row = await store.get("c")
    assert row is not None
    assert (row.last_seq, row.error) == (1, None)  # the row update rolled back with the failed insert
    with pytest.raises(StoreUnavailableError, match="no such table: events"):
        await store.load("c")
    await store.close()


async def test_a_write_waits_for_another_connections_lock_without_blocking_the_event_loop(tmp_path: Path) -> None:
    """Another process (here: a second connection) holds the write lock for 0.3 s. Our append waits on the
    event loop, which keeps running other tasks, and lands once the lock is free."""
    store = await _sqlite(tmp_path)
    await store.create(_row("c1"), [Started(seq=1, at=T0, dialog="m:bot")])
    other = sqlite3.connect(f"{tmp_path}/bot.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ticks = 0
    appended = anyio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not appended.is_set():
            ticks += 1
            await anyio.sleep(0.01)

    async def append() -> None:
        await store.append("c1", [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)
        appended.set()

    async def release_later() -> None:
        await anyio.sleep(0.3)
        other.execute("COMMIT")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(tick)
            group.start_soon(release_later)
            group.start_soon(append)
    other.close()
    assert [e.seq for e in await store.load("c1")] == [1, 2]
    assert ticks >= 10  # the loop ran the ticker all along: about 30 ticks in 0.3 s, none if it was blocked
    await store.close()


async def test_a_lock_held_past_busy_timeout_is_store_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/bot.db?busy_timeout=0.2")
    await store.create(_row("c1"), [Started(seq=1, at=T0, dialog="m:bot")])
    other = sqlite3.connect(f"{tmp_path}/bot.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailableError, match="locked"):
        await store.append("c1", [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)
    other.execute("COMMIT")
    other.close()
    assert [e.seq for e in await store.load("c1")] == [1]
    await store.append("c1", [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)  # and it recovers
    assert [e.seq for e in await store.load("c1")] == [1, 2]
    await store.close()


async def test_a_provisional_append_writes_its_row_but_does_not_read_it_back(tmp_path: Path) -> None:
    """The append before a hand-off (``RowUpdate.provisional``) skips the UPDATE's RETURNING, most of its
    cost: it returns None, and the row it wrote is there all the same."""
    store = await _sqlite(tmp_path)
    await store.create(_row("c1"), [Started(seq=1, at=T0, dialog="m:bot")])
    update = RowUpdate(state="waiting_for_reply", provisional=True)
    assert await store.append("c1", [Sent(seq=2, at=T0, text="hi")], update, T0) is None
    row = await store.get("c1")
    assert row is not None
    assert (row.last_seq, row.state) == (2, "waiting_for_reply")
    with pytest.raises(ConflictError):  # still a compare-and-set on the log's end
        await store.append("c1", [Sent(seq=2, at=T0, text="again")], update, T0)
    await store.close()


async def _lock_file(tmp_path: Path) -> sqlite3.Connection:
    """Another connection (as another runner process) holding the file's write lock."""
    other = sqlite3.connect(f"{tmp_path}/bot.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


async def test_writes_that_meet_another_connections_lock_wait_as_one_batch(tmp_path: Path) -> None:
    """While another connection holds the lock, the batch that met it waits as a whole, open to the writes
    that come meanwhile, and commits them all in one transaction once the lock is free (each write waiting
    and trying again on its own made a transaction per wake-up, and far more attempts)."""
    store = await _sqlite(tmp_path)
    ids = [f"c{i}" for i in range(12)]
    for cid in ids:
        await store.create(_row(cid), [Started(seq=1, at=T0, dialog="m:bot")])
    other = await _lock_file(tmp_path)
    committed = store.commits

    async def append(cid: str) -> None:
        await store.append(cid, [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)

    async def later() -> None:
        await anyio.sleep(0.11)  # the first writes have met the lock and wait (off their retry rhythm)
        for cid in ids[8:]:
            group.start_soon(append, cid)
        await anyio.sleep(0.2)
        other.execute("COMMIT")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for cid in ids[:8]:
                group.start_soon(append, cid)
            group.start_soon(later)
    other.close()
    assert store.commits - committed == 1
    for cid in ids:
        assert [e.seq for e in await store.load(cid)] == [1, 2]
    await store.close()


async def test_a_batch_waiting_for_the_lock_outlives_its_cancelled_leader(tmp_path: Path) -> None:
    """The task whose write opened a batch is cancelled while the batch waits for another connection's lock:
    its write never runs, and the other writes of the batch still land once the lock is free."""
    store = await _sqlite(tmp_path)
    for cid in ("c1", "c2", "c3"):
        await store.create(_row(cid), [Started(seq=1, at=T0, dialog="m:bot")])
    other = await _lock_file(tmp_path)
    leader_scope = anyio.CancelScope()

    async def lead() -> None:
        with leader_scope:
            await store.append("c1", [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)

    async def follow(cid: str) -> None:
        await store.append(cid, [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)

    async def later() -> None:
        await anyio.sleep(0.1)
        leader_scope.cancel()
        await anyio.sleep(0.1)
        other.execute("COMMIT")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(lead)  # first in: it opens the batch the others join
            group.start_soon(follow, "c2")
            group.start_soon(follow, "c3")
            group.start_soon(later)
    other.close()
    assert leader_scope.cancelled_caught
    assert [e.seq for e in await store.load("c1")] == [1]
    assert [e.seq for e in await store.load("c2")] == [1, 2]
    assert [e.seq for e in await store.load("c3")] == [1, 2]
    await store.close()


async def test_a_batch_locked_out_past_busy_timeout_fails_every_write_and_writes_nothing(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/bot.db?busy_timeout=0.2")
    for cid in ("c1", "c2"):
        await store.create(_row(cid), [Started(seq=1, at=T0, dialog="m:bot")])
    other = await _lock_file(tmp_path)
    failures: list[BaseException] = []

    async def append(cid: str) -> None:
        try:
            await store.append(cid, [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)
        except StoreUnavailableError as exc:
            failures.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(append, "c1")
            group.start_soon(append, "c2")
    other.execute("COMMIT")
    other.close()
    assert len(failures) == 2
    assert all("locked" in str(exc) for exc in failures)
    assert [e.seq for e in await store.load("c1")] == [1] == [e.seq for e in await store.load("c2")]
    await store.append("c1", [Sent(seq=2, at=T0, text="hi")], RowUpdate(), T0)  # and it recovers
    assert [e.seq for e in await store.load("c1")] == [1, 2]
    await store.close()


async def test_checkpoints_run_in_a_thread_of_their_own_not_inside_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's automatic checkpoint runs inside a commit, on the event loop, and stalls every conversation;
    the store checkpoints in a thread instead, and keeps the automatic one only as a far backstop."""
    ran_in: list[str] = []
    checkpoint = SQLiteStore._checkpoint

    def recording(self: SQLiteStore) -> None:
        ran_in.append(threading.current_thread().name)
        checkpoint(self)

    monkeypatch.setattr(SQLiteStore, "_checkpoint", recording)
    monkeypatch.setattr(SQLiteStore, "CHECKPOINT_EVERY", 0.0)
    store = await _sqlite(tmp_path)
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone() == (50000,)
    await store.create(_row("a"), [Started(seq=1, at=T0, dialog="m:bot")])
    for seq in range(2, 12):
        await store.append("a", [Sent(seq=seq, at=T0, text=f"m{seq}")], RowUpdate(), T0)
    await store.close()  # joins a checkpoint still running
    assert ran_in
    assert set(ran_in) == {"dynaprompt-sqlite-checkpoint"}
    reopened = await _sqlite(tmp_path)
    assert [event.seq for event in await reopened.load("a")] == list(range(1, 12))
    await reopened.close()
