"""The SQLite store reads a log back in one validation call, and still names the bad row of a damaged one.

A load joins the stored bodies into one JSON array and validates it at once; whatever does not add up (a body
that is not one event, a body at the wrong row, a missing row) is read again row by row, which raises
``CorruptEventError`` naming the conversation and the seq, as each row validated alone always did.
"""

from __future__ import annotations

import gc
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dynaprompt import CorruptEventError, ListChannel, Runner, dialog, open_store, send, wait_for_reply
from dynaprompt.events import Started, event_to_json, events_from_json, log_from_json
from dynaprompt.stores.sqlite import SQLiteStore
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio


@dialog(name="tests:echo")
def echo():  # type: ignore[no-untyped-def]
    while True:
        reply = yield wait_for_reply()
        yield send(f"echo {reply.text}")


@pytest.fixture
async def logged(tmp_path: Path, clock: VirtualClock) -> AsyncIterator[tuple[SQLiteStore, sqlite3.Connection]]:
    """A store holding conversation "c1" with a log of ten events, and a second connection to change rows."""
    store = await open_store(f"sqlite:///{tmp_path}/bot.db")
    assert isinstance(store, SQLiteStore)
    async with Runner(store, clock=clock) as runner:
        await runner.start(echo, "c1")
        await runner.deliver("c1", "one")
        await runner.deliver("c1", "two")
    database = sqlite3.connect(f"{tmp_path}/bot.db", isolation_level=None)
    assert database.execute("SELECT count(*) FROM events WHERE conversation_id = 'c1'").fetchone() == (10,)
    yield store, database
    database.close()
    await store.close()


def body(database: sqlite3.Connection, seq: int) -> str:
    (text,) = database.execute("SELECT body FROM events WHERE conversation_id = 'c1' AND seq = ?", (seq,)).fetchone()
    return str(text)


def set_body(database: sqlite3.Connection, seq: int, text: str) -> None:
    database.execute("UPDATE events SET body = ? WHERE conversation_id = 'c1' AND seq = ?", (text, seq))


async def test_a_log_reads_back_as_it_was_written(logged: tuple[SQLiteStore, sqlite3.Connection]) -> None:
    store, database = logged
    events = await store.load("c1")
    assert [event.seq for event in events] == list(range(1, 11))
    assert [event_to_json(event) for event in events] == [body(database, seq) for seq in range(1, 11)]
    assert [event.seq for event in await store.load("c1", 7)] == [8, 9, 10]
    assert await store.load("c1", 10) == []
    assert await store.load("nobody") == []


async def test_a_sound_log_is_validated_in_one_call(
    logged: tuple[SQLiteStore, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = logged
    expected = await store.load("c1")

    def row_by_row(*args: object) -> None:
        raise AssertionError("a sound log was read row by row")

    monkeypatch.setattr("dynaprompt.stores.sqlite.events_from_json", row_by_row)
    assert await store.load("c1") == expected
    assert await store.load("c1", 4) == expected[4:]


async def test_the_order_of_the_joined_bodies_is_checked_not_assumed(
    logged: tuple[SQLiteStore, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = logged
    expected = await store.load("c1")
    reversed_order = (
        "SELECT count(*), max(seq), group_concat(body, ',') FROM "
        "(SELECT seq, body FROM events WHERE conversation_id = ? AND seq > ? ORDER BY seq DESC)"
    )
    monkeypatch.setattr("dynaprompt.stores.sqlite._LOAD_JOINED", reversed_order)
    assert await store.load("c1") == expected


async def test_a_body_that_is_not_json_is_named(logged: tuple[SQLiteStore, sqlite3.Connection]) -> None:
    store, database = logged
    set_body(database, 3, "{garbage")
    with pytest.raises(CorruptEventError) as raised:
        await store.load("c1")
    assert (raised.value.conversation_id, raised.value.seq) == ("c1", 3)
    with pytest.raises(CorruptEventError, match="seq 3"):
        await store.load("c1", 2)
    assert [event.seq for event in await store.load("c1", 3)] == [4, 5, 6, 7, 8, 9, 10]


async def test_a_body_that_is_not_utf8_is_named_not_taken_for_a_broken_database(
    logged: tuple[SQLiteStore, sqlite3.Connection],
) -> None:
    """SQLite cannot make a str of such a body: read as bytes, it is a corrupt event with its seq (it was
    ``StoreUnavailableError``, as if the database had gone away), and the rows around it are untouched."""
    store, database = logged
    good = body(database, 6)
    database.execute("UPDATE events SET body = CAST(x'7b22ff22' AS TEXT) WHERE conversation_id = 'c1' AND seq = 6")
    with pytest.raises(CorruptEventError) as raised:
        await store.load("c1")
    assert (raised.value.conversation_id, raised.value.seq) == ("c1", 6)
    assert [event.seq for event in await store.load("c1", 6)] == [7, 8, 9, 10]
    set_body(database, 6, good)
    assert [event.seq for event in await store.load("c1")] == list(range(1, 11))


async def test_a_body_at_the_wrong_row_is_named(logged: tuple[SQLiteStore, sqlite3.Connection]) -> None:
    store, database = logged
    set_body(database, 3, body(database, 4))  # row 3 now says it is seq 4
    with pytest.raises(CorruptEventError, match=r"'c1'.*seq 3.*it says seq 4"):
        await store.load("c1")


async def test_two_swapped_bodies_are_named(logged: tuple[SQLiteStore, sqlite3.Connection]) -> None:
    store, database = logged
    third, fourth = body(database, 3), body(database, 4)
    set_body(database, 3, fourth)
    set_body(database, 4, third)
    with pytest.raises(CorruptEventError, match=r"seq 3.*it says seq 4"):
        await store.load("c1")


@pytest.mark.parametrize("row_four", ["kept", "deleted"])
async def test_a_body_holding_two_events_is_named(
    logged: tuple[SQLiteStore, sqlite3.Connection], row_four: str
) -> None:
    # Joined, the rows would read as one event per seq once row 4 is gone: the row count gives it away.
    store, database = logged
    set_body(database, 3, body(database, 3) + "," + body(database, 4))
    if row_four == "deleted":
        database.execute("DELETE FROM events WHERE conversation_id = 'c1' AND seq = 4")
    with pytest.raises(CorruptEventError) as raised:
        await store.load("c1")
    assert raised.value.seq == 3


async def test_a_missing_row_is_named_when_the_conversation_resumes(
    logged: tuple[SQLiteStore, sqlite3.Connection], clock: VirtualClock
) -> None:
    store, database = logged
    database.execute("DELETE FROM events WHERE conversation_id = 'c1' AND seq = 5")
    assert [event.seq for event in await store.load("c1")] == [1, 2, 3, 4, 6, 7, 8, 9, 10]  # each row itself is sound
    async with Runner(store, clock=clock, cache_size=0) as runner:
        with pytest.raises(CorruptEventError, match=r"'c1'.*seq 6.*expected seq 5"):
            await runner.deliver("c1", "three")


def test_rows_are_validated_at_once_or_one_by_one_with_the_same_result() -> None:
    rows = [(1, '{"seq":1,"at":"2026-01-01T00:00:00Z","kind":"now","value":"2026-01-01T00:00:00Z"}')]
    rows.append((2, '{"seq":2,"at":"2026-01-01T00:00:00Z","kind":"delivered","message_id":"c1:1"}'))
    joined = "[" + ",".join(text for _, text in rows) + "]"
    events = events_from_json("c1", rows)
    assert log_from_json(joined, 1, 2) == events
    assert [events_from_json("c1", [row])[0] for row in rows] == events
    assert log_from_json(joined, 2, 2) is None  # not the seqs asked for
    assert log_from_json(joined, 1, 3) is None  # not as many as asked for
    assert log_from_json("[" + joined, 1, 2) is None
    with pytest.raises(CorruptEventError, match=r"seq 3.*it says seq 2"):
        events_from_json("c1", [rows[0], (3, rows[1][1])])
    with pytest.raises(CorruptEventError, match=r"seq 2"):
        events_from_json("c1", [rows[0], (2, rows[1][1] + "," + rows[1][1])])


async def test_an_event_is_stored_without_the_fields_left_at_their_defaults(
    logged: tuple[SQLiteStore, sqlite3.Connection],
) -> None:
    _store, database = logged
    stored = [json.loads(body(database, seq)) for seq in range(1, 11)]
    assert all(next(iter(fields)) == "kind" for fields in stored)  # the discriminator first
    sent = next(fields for fields in stored if fields["kind"] == "sent")
    assert set(sent) == {"kind", "seq", "at", "text"}  # no "to": null, "metadata": {}, "due_at": null
    started = Started(seq=1, at=datetime(2026, 1, 1, tzinfo=UTC), dialog="d", args=[1], kwargs={"a": None}, run=2)
    assert json.loads(event_to_json(started)) == {
        "kind": "started", "seq": 1, "at": "2026-01-01T00:00:00Z", "dialog": "d", "args": [1],
        "kwargs": {"a": None}, "run": 2,
    }  # fmt: skip
    assert events_from_json("c1", [(1, event_to_json(started))]) == [started]


async def test_a_log_written_with_every_field_still_loads_and_resumes(
    logged: tuple[SQLiteStore, sqlite3.Connection], clock: VirtualClock
) -> None:
    # Bodies of the earlier format (every field, defaults too, kind after seq and at) are a durable format:
    # they must read back as the same events, alone, joined, and when a cold runner resumes from them.
    store, database = logged
    events = await store.load("c1")
    for event in events:
        set_body(database, event.seq, event.model_dump_json())
    assert '"args":[],"kwargs":{}' in body(database, 1)
    assert body(database, 1).startswith('{"seq":1,')
    assert await store.load("c1") == events
    assert events_from_json("c1", [(event.seq, body(database, event.seq)) for event in events]) == events
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=0) as runner:
        await runner.deliver("c1", "three")
        transcript = [(entry.direction, entry.text) for entry in await runner.transcript("c1")]
    assert [message.text for message in channel.messages] == ["echo three"]
    assert transcript[-2:] == [("in", "three"), ("out", "echo three")]
    assert body(database, 11).startswith('{"kind":"reply",')  # what is appended now is the new format


async def test_logs_read_together_come_out_as_each_reads_alone_and_a_damaged_one_is_named(
    logged: tuple[SQLiteStore, sqlite3.Connection],
) -> None:
    """``load_logs`` (run_due's read of the conversations it wakes together) gives what ``load`` gives each; a
    damaged log is read again row by row, so the error names its bad seq as ``load`` does."""
    store, database = logged
    logs = await store.load_logs(["c1", "nobody"])
    assert logs == {"c1": await store.load("c1"), "nobody": []}
    set_body(database, 4, body(database, 5))
    with pytest.raises(CorruptEventError) as failure:
        await store.load_logs(["nobody", "c1"])
    assert (failure.value.conversation_id, failure.value.seq) == ("c1", 4)


collector_seen: list[bool] = []


@dialog(name="tests:collector_watch")
def collector_watch():  # type: ignore[no-untyped-def]
    """Notes, at each turn, whether the cyclic garbage collector runs while its code does."""
    while True:
        reply = yield wait_for_reply()
        collector_seen.append(gc.isenabled())
        yield send(f"echo {reply.text}")


async def test_a_cold_resume_replays_its_log_with_the_collector_paused_and_resumes_it_before_writing(
    tmp_path: Path, clock: VirtualClock
) -> None:
    # The events a load builds are freed by the replay before the collector walks them (CollectorHold): the
    # replayed turns run with it paused, and it runs again once the advance has returned, before any write.
    store = await open_store(f"sqlite:///{tmp_path}/bot.db")
    async with Runner(store, clock=clock, cache_size=16) as runner:  # warm even when the suite runs with the cache off
        await runner.start(collector_watch, "c1")
        for text in ("one", "two", "three"):
            await runner.deliver("c1", text)
    assert collector_seen == [True, True, True]  # warm turns: nothing loaded, nothing paused
    collector_seen.clear()
    enabled_at_write: list[bool] = []
    append = store.append

    async def watched_append(*args: Any, **kwargs: Any) -> Any:
        enabled_at_write.append(gc.isenabled())
        return await append(*args, **kwargs)

    store.append = watched_append  # type: ignore[method-assign]
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=0) as cold:
        await cold.deliver("c1", "four")
    assert collector_seen == [False, False, False, False]  # three replayed turns and the new one
    assert enabled_at_write
    assert all(enabled_at_write)
    assert gc.isenabled()
    assert [message.text for message in channel.messages] == ["echo four"]
    await store.close()


async def test_the_collector_runs_again_when_a_cold_resume_fails(
    logged: tuple[SQLiteStore, sqlite3.Connection], clock: VirtualClock
) -> None:
    store, database = logged
    ten = body(database, 10)
    set_body(database, 10, body(database, 9))
    set_body(database, 9, ten)  # validated at once, then found out of order: read again row by row, named
    async with Runner(store, clock=clock, cache_size=0) as runner:
        with pytest.raises(CorruptEventError, match=r"'c1'.*seq 9"):
            await runner.deliver("c1", "three")
    assert gc.isenabled()
