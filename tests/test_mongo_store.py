"""The MongoDB store on a real MongoDB wire server: documents, repair after a crash between two writes,
clients it was given, the runner on it, outages, and the CLI.

The whole Store protocol is checked by ``test_store_conformance.py`` (a ``mongodb`` and a
``mongodb-motor`` leg); these tests cover what only the MongoDB store has.
"""

from __future__ import annotations

import gc
import socket
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect

from dynaprompt import Runner, dialog, finish, open_store, send, sleep, sleep_until, wait_for_reply
from dynaprompt.errors import CorruptEventError, StoreUnavailableError
from dynaprompt.events import ReplyReceived, Started
from dynaprompt.stores.base import ConversationRow, RowUpdate
from dynaprompt.stores.mongo import MongoStore
from dynaprompt.testing import ListChannel, VirtualClock

pytestmark = pytest.mark.anyio


@dialog(name="mongo-test-greeter")
async def greeter(name: str):  # type: ignore[no-untyped-def]
    yield send(f"Hi {name}! How did you sleep?")
    reply = yield wait_for_reply(timeout="2 hours")
    yield send("No answer, fine." if reply is None else f"Noted: {reply.text}.")
    yield sleep_until("tomorrow at 9am")
    yield send("Good morning!")
    again = yield wait_for_reply()
    yield finish(again.text)


@pytest.fixture
async def store(mongodb_url: str) -> AsyncIterator[MongoStore]:
    opened = await open_store(mongodb_url)
    assert isinstance(opened, MongoStore)
    yield opened
    await opened.close()


async def row_seen_afresh(store: MongoStore, conversation_id: str) -> ConversationRow | None:
    """The conversation's row as another process reads it: through a new store on the same database."""
    fresh = await open_store(store.url)
    try:
        return await fresh.get(conversation_id)
    finally:
        await fresh.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- opening ----------------------------------------------------------------------------


async def test_unreachable_server_at_open_names_the_url_with_the_password_masked() -> None:
    url = f"mongodb://ann:s3cret@127.0.0.1:{free_port()}/bot"
    with pytest.raises(StoreUnavailableError) as raised:
        await open_store(url, server_selection_timeout=0.2)
    message = str(raised.value)
    assert f"mongodb://ann:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message
    assert "s3cret" not in message
    # pymongo's monitor may drop its refused socket without closing it; let it go here, not in a later test.
    del raised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await anyio.sleep(0.3)
        gc.collect()


async def test_open_creates_the_indexes_due_work_is_found_through(store: MongoStore) -> None:
    events = await store.database["events"].index_information()
    rows = await store.database["conversations"].index_information()
    schedules = await store.database["schedules"].index_information()
    assert {"key": [("conversation_id", 1), ("seq", 1)], "unique": True}.items() <= {
        "key": events["conversation_id_1_seq_1"]["key"],
        "unique": events["conversation_id_1_seq_1"].get("unique"),
    }.items()
    assert sorted(index["key"] for index in rows.values()) == [
        [("_id", 1)], [("lease_until", 1)], [("needs_advance", 1), ("lease_until", 1)], [("wake_at", 1)],
    ]  # fmt: skip
    assert [("next_at", 1)] in [index["key"] for index in schedules.values()]


async def test_each_event_is_one_plain_document(store: MongoStore, clock: VirtualClock) -> None:
    async with Runner(store, clock=clock) as runner:
        await runner.start(greeter, "ann", "Ann")
        await runner.deliver("ann", "Slept well", metadata={"via": "sms"})
    docs = await store.database["events"].find({"conversation_id": "ann"}, {"_id": 0}).sort("seq", 1).to_list(None)
    assert [doc["seq"] for doc in docs] == list(range(1, len(docs) + 1))
    reply = next(doc for doc in docs if doc["kind"] == "reply")
    assert reply == {
        "conversation_id": "ann", "seq": reply["seq"], "kind": "reply", "at": "2026-01-05T09:00:00Z",
        "text": "Slept well", "metadata": {"via": "sms"},
    }  # fmt: skip
    # Fields at their defaults are left out (to=None, metadata={}, due_at=None): they read back as such.
    sent = next(doc for doc in docs if doc["kind"] == "sent")
    assert sent == {
        "conversation_id": "ann",
        "kind": "sent",
        "seq": sent["seq"],
        "at": sent["at"],
        "text": sent["text"],
    }
    row = await store.database["conversations"].find_one({"_id": "ann"})
    assert row is not None
    assert row["state"] == "sleeping"
    assert row["last_seq"] == len(docs)
    assert row["wake_at"] == 1767690000 * 1_000_000  # 2026-01-06 09:00 UTC, in microseconds
    assert row["lease_owner"] is None


# -- a crash between the two writes of an append -----------------------------------------


async def test_reply_whose_row_update_never_happened_is_found_and_consumed(
    store: MongoStore, clock: VirtualClock
) -> None:
    channel = ListChannel()
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(greeter, "ann", "Ann")
    before = await store.get("ann")
    assert before is not None
    # What a writer killed between its insert_many and its row update leaves: the event, an old row.
    lost = ReplyReceived(seq=before.last_seq + 1, at=clock.now(), text="Slept badly")
    await store.database["events"].insert_one({"conversation_id": "ann", **lost.model_dump(mode="json")})

    repaired = await store.get("ann")
    assert repaired is not None
    assert (repaired.last_seq, repaired.needs_advance) == (before.last_seq + 1, True)
    assert await store.due(clock.now(), 10) == ["ann"]
    async with Runner(store, channel, clock=clock) as runner:  # a runner started later
        assert await runner.run_due() == 1
        assert (await runner.status("ann")).state == "sleeping"
    assert channel.texts() == ["Hi Ann! How did you sleep?", "Noted: Slept badly."]


async def test_log_whose_row_was_never_written_gets_its_row_rebuilt(store: MongoStore, clock: VirtualClock) -> None:
    started = Started(seq=1, at=clock.now(), dialog="mongo-test-greeter", args=["Bo"], tz="Europe/Paris")
    await store.database["events"].insert_one({"conversation_id": "bo", **started.model_dump(mode="json")})

    row = await store.get("bo")
    assert row is not None
    assert (row.dialog, row.tz, row.last_seq, row.needs_advance) == ("mongo-test-greeter", "Europe/Paris", 1, True)
    channel = ListChannel()
    async with Runner(store, channel, clock=clock) as runner:
        await runner.run_due()
        assert (await runner.status("bo")).state == "waiting_for_reply"
    assert channel.texts() == ["Hi Bo! How did you sleep?"]


async def test_corrupt_event_document_names_the_conversation_and_seq(store: MongoStore, clock: VirtualClock) -> None:
    async with Runner(store, clock=clock) as runner:
        await runner.start(greeter, "ann", "Ann")
    await store.database["events"].update_one({"conversation_id": "ann", "seq": 2}, {"$set": {"text": 42}})
    with pytest.raises(CorruptEventError, match=r"'ann'.*seq 2.*text"):
        await store.load("ann")


# -- row updates as a compare-and-swap on the row the store last saw ------------------------------


class CountedCalls:
    """One of the store's collections, listing the calls made through it (with the write concern's ``j``)."""

    def __init__(self, collection: Any, calls: list[str]) -> None:
        self.collection = collection
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.collection, name)
        if name in (
            "update_one",
            "update_many",
            "find_one_and_update",
            "insert_one",
            "insert_many",
            "find_one",
            "find",
        ):
            journaled = "j" if self.collection.write_concern.document.get("j") else "no j"
            self.calls.append(f"{self.collection.name}.{name} ({journaled})")
        return method


async def test_a_warm_turn_updates_the_row_without_reading_it_back(store: MongoStore, clock: VirtualClock) -> None:
    calls: list[str] = []
    for attribute in ("_events", "_rows", "_rows_unjournaled"):
        setattr(store, attribute, CountedCalls(getattr(store, attribute), calls))
    async with Runner(store, clock=clock, cache_size=16) as runner:  # warm, even when the suite runs with 0
        await runner.start(counter, "ann")
        calls.clear()
        status = await runner.deliver("ann", "one")
    assert calls == [
        "conversations.update_one (no j)",  # the claim: the journal flush of the insert after it covers it
        "events.insert_many (j)",  # the reply, the bot's message, the wait (their row write is put off)
        "events.insert_many (j)",  # the delivered mark
        "conversations.update_one (no j)",  # the row, for both appends, as a compare-and-swap, dropping the lease:
    ]  # its events are journaled, and a row lost with the server is repaired from them (see MongoStore)
    stored = await store.database["conversations"].find_one({"_id": "ann"})
    assert stored is not None
    assert (status.state, status.last_seq) == ("waiting_for_reply", stored["last_seq"])
    assert (stored["lease_owner"], stored["lease_until"], stored["needs_advance"]) == (None, None, False)
    assert await row_seen_afresh(store, "ann") == store._seen["ann"]  # what another process reads: the same


@dialog(name="mongo-test-napper")
async def napper():  # type: ignore[no-untyped-def]
    yield sleep(60)
    yield send("rested")


async def test_a_timer_wake_up_claims_with_its_batch_and_then_writes_as_a_warm_turn(
    store: MongoStore, clock: VirtualClock
) -> None:
    """run_due claims the due batch in one update_many; the wake-up's own claim then tries our lease first (one
    update, not a refused one and another), and its row write is still put off to the hand-off's, as in a warm
    turn: the batch claim leaves what this store saw of the row a good hint."""
    calls: list[str] = []
    for attribute in ("_events", "_rows", "_rows_unjournaled"):
        setattr(store, attribute, CountedCalls(getattr(store, attribute), calls))
    async with Runner(store, clock=clock, cache_size=0) as runner:
        await runner.start(napper, "nap")
        await runner.run_due()  # the first pass of a runner also looks for dead runners' leases
        clock.advance(timedelta(seconds=61))
        calls.clear()
        assert await runner.run_due() == 1
    assert calls == [
        *["conversations.find (j)"] * 3,  # due(): flagged, expired leases, due timers
        "conversations.update_many (j)",  # the batch's claim
        "conversations.find (j)",  # which of the batch it took
        "events.find (j)",  # the batch's logs, read together
        "conversations.update_one (no j)",  # the claim with the append: our lease, found at the first try
        "events.insert_many (j)",  # timer fired, sent, completed (their row write is put off)
        "events.insert_many (j)",  # the delivered mark
        "conversations.update_one (no j)",  # the row, for both appends, dropping the lease
    ]
    stored = await store.database["conversations"].find_one({"_id": "nap"})
    assert stored is not None
    assert (stored["state"], stored["lease_owner"], stored["lease_until"]) == ("completed", None, None)


class HoldingChannel:
    """A channel that, while it holds a message, lets a test look at the store from elsewhere (or refuses)."""

    def __init__(self, during: Callable[[], Any] | None = None, *, refuse: bool = False) -> None:
        self.during = during
        self.refuse = refuse
        self.texts: list[str] = []

    async def deliver(self, message: Any) -> None:
        if self.during is not None:
            await self.during()
        if self.refuse:
            raise RuntimeError("channel down (injected)")
        self.texts.append(message.text)


async def test_a_row_read_during_the_hand_off_shows_the_events_and_ends_right(
    store: MongoStore, clock: VirtualClock
) -> None:
    """The row write of the append before a hand-off is put off to the "delivered" append: meanwhile another
    process reading the row finds events past its last_seq (as after a crash between two writes) and flags
    it; the turn's last write still leaves the row whole, lease free, flag cleared."""
    seen: list[ConversationRow | None] = []

    async def look() -> None:
        seen.append(await row_seen_afresh(store, "ann"))

    async with Runner(store, clock=clock, cache_size=16) as runner:
        await runner.start(counter, "ann")
        runner.channel = HoldingChannel(look)
        status = await runner.deliver("ann", "one")
    top = await store.database["events"].find_one({"conversation_id": "ann"}, sort=[("seq", -1)])
    assert top is not None
    assert status.last_seq == top["seq"]
    during = seen[0]
    assert during is not None
    assert (during.last_seq, during.needs_advance, during.lease_owner) == (top["seq"] - 1, True, runner.owner)
    after = await row_seen_afresh(store, "ann")
    assert after is not None
    assert (after.state, after.last_seq, after.needs_advance, after.lease_owner) == (
        "waiting_for_reply", top["seq"], False, None,
    )  # fmt: skip


async def test_a_refused_hand_off_still_writes_the_row_before_the_lease_goes(
    store: MongoStore, clock: VirtualClock
) -> None:
    """The channel refuses, so no "delivered" append carries the row write put off before the hand-off: the
    release makes it first, and the row matches the log, lease free, message still queued."""
    async with Runner(store, clock=clock, cache_size=16) as runner:
        await runner.start(counter, "ann")
        runner.channel = HoldingChannel(refuse=True)
        status = await runner.deliver("ann", "one")
        assert not store._deferred
    top = await store.database["events"].find_one({"conversation_id": "ann"}, sort=[("seq", -1)])
    assert top is not None
    assert top["kind"] == "waiting"
    after = await row_seen_afresh(store, "ann")
    assert after is not None
    assert (status.last_seq, after.last_seq, after.needs_advance, after.lease_owner) == (
        top["seq"], top["seq"], False, None,
    )  # fmt: skip
    channel = HoldingChannel()
    async with Runner(store, channel, clock=clock) as runner:
        assert await runner.run_due() >= 0
        await runner.deliver("ann", "two")
    assert channel.texts == ["1: one", "2: two"]


async def test_a_reply_another_process_appends_during_the_hand_off_repeats_no_message(
    store: MongoStore, clock: VirtualClock
) -> None:
    """While the channel holds the bot's message (row write put off, lease held), another process makes a reply
    durable at the seq the "delivered" mark was to have: the mark goes after it, and the message is handed
    over once."""
    other = await open_store(store.url)
    replies = ["meanwhile"]

    async def reply_elsewhere() -> None:
        if replies:
            async with Runner(other, clock=clock) as elsewhere:
                await elsewhere.deliver("ann", replies.pop())

    channel = HoldingChannel(reply_elsewhere)
    try:
        async with Runner(store, channel, clock=clock, cache_size=16) as runner:
            await runner.start(counter, "ann")
            await runner.deliver("ann", "one")
            await runner.run_due()
    finally:
        await other.close()
    assert channel.texts == ["1: one", "2: meanwhile"]
    after = await row_seen_afresh(store, "ann")
    assert after is not None
    assert (after.state, after.needs_advance, after.lease_owner) == ("waiting_for_reply", False, None)


async def test_a_turns_last_row_write_lost_with_the_server_loses_nothing(
    store: MongoStore, clock: VirtualClock
) -> None:
    """That write does not wait for the journal. Lost with the server, it leaves the row as the turn's claim did
    (journaled by the events insert after it): leased, last_seq behind the log. The holder goes on at once;
    another runner's reply is made durable, and consumed once the lease has expired."""
    first, second = ListChannel(), ListChannel()
    async with Runner(store, first, clock=clock) as holder, Runner(store, second, clock=clock) as other:
        await holder.start(counter, "c")
        until = (clock.now() + holder.lease - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        for text in ("one", "two"):
            before = await store.get("c")
            assert before is not None
            await holder.deliver("c", text)  # after the loss of the last one: its own lease, taken back at once
            lost = {"last_seq": before.last_seq, "lease_owner": holder.owner, "lease_until": until}
            await store.database["conversations"].update_one({"_id": "c"}, {"$set": lost})  # as the server lost it
        await other.deliver("c", "three")  # durable now, consumed once the lease has expired
        assert second.texts() == []
        clock.advance(holder.lease + timedelta(seconds=1))
        assert await other.run_due() == 1
        heard = [entry.text for entry in await other.transcript("c") if entry.direction == "in"]
    assert heard == ["one", "two", "three"]
    assert first.texts() + second.texts() == ["1: one", "2: two", "3: three"]
    row = await store.get("c")
    assert row is not None
    assert (row.lease_owner, row.needs_advance, row.state) == (None, False, "waiting_for_reply")


async def test_a_put_off_row_write_landing_after_a_later_one_leaves_that_one(
    store: MongoStore, clock: VirtualClock
) -> None:
    """Another use of the row (the serve loop's due(), say) takes the put-off write and makes it, while the
    turn's last write, which no longer carries it, lands first: the put-off write must not undo or flag it."""
    now = clock.now()
    row = ConversationRow(
        id="di", dialog="mongo-test-counter", state="waiting_for_reply", last_seq=1, updated_at=now,
        lease_owner="me", lease_until=now + timedelta(seconds=30),
    )  # fmt: skip
    await store.create(row, [Started(seq=1, at=now, dialog="mongo-test-counter")])
    full: dict[str, Any] = {
        "state": "waiting_for_reply", "needs_advance": False, "parked": False,
        "clear": frozenset({"wake_at", "result", "error"}),
    }  # fmt: skip
    await store.append("di", [ReplyReceived(seq=2, at=now, text="a")], RowUpdate(**full, provisional=True), now)
    taken = store._deferred.pop("di")  # taken by another use of the row; its write is still on the way
    last = RowUpdate(**full, release_owner="me")
    await store.append("di", [ReplyReceived(seq=3, at=now, text="b")], last, now)
    store._deferred["di"] = taken
    await store._write_deferred("di")  # lands now
    stored = await store.get("di")
    assert stored is not None
    assert (stored.last_seq, stored.needs_advance, stored.lease_owner) == (3, False, None)


async def test_a_row_changed_by_another_store_is_read_back_not_guessed(mongodb_url: str, clock: VirtualClock) -> None:
    """The store's view of the row is only a hint: another writer took the lease meanwhile, so the append's
    compare-and-swap misses and the row is updated and read back as before, leaving the new holder's lease."""
    ours, theirs = await open_store(mongodb_url), await open_store(mongodb_url)
    try:
        assert isinstance(ours, MongoStore)
        now = clock.now()
        started = Started(seq=1, at=now, dialog="mongo-test-counter")
        row = ConversationRow(
            id="bo", dialog="mongo-test-counter", state="waiting_for_reply", last_seq=1, updated_at=now,
            lease_owner="ours", lease_until=now + timedelta(seconds=1),
        )  # fmt: skip
        await ours.create(row, [started])
        later = now + timedelta(seconds=5)  # our lease has expired: another runner takes it
        assert await theirs.acquire("bo", "theirs", later + timedelta(seconds=30), later) is not None
        reply = ReplyReceived(seq=2, at=later, text="hi")
        update = RowUpdate(
            state="waiting_for_reply", needs_advance=False, parked=False, release_owner="ours",
            clear=frozenset({"wake_at", "result", "error"}),
        )  # fmt: skip
        written = await ours.append("bo", [reply], update, later)
        assert (written.last_seq, written.lease_owner) == (2, "theirs")
        assert written == await theirs.get("bo")
    finally:
        await ours.close()
        await theirs.close()


async def test_a_row_update_whose_answer_was_lost_returns_the_row_as_stored(
    store: MongoStore, clock: VirtualClock
) -> None:
    """The compare-and-swap went through but its answer was lost: the retry misses (the row moved), and the
    row is updated again guarded by its last_seq and read back, not written twice or left leased."""
    rows = store._rows

    class AnswerLost:
        def __init__(self) -> None:
            self.lost = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(rows, name)

        async def update_one(self, query: dict[str, Any], change: dict[str, Any], **kwargs: Any) -> Any:
            result = await rows.update_one(query, change, **kwargs)
            if self.lost < 3:
                self.lost += 1
                raise AutoReconnect("connection reset after the write (injected)")
            return result

    channel = ListChannel()
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(counter, "ann")
        store._rows = AnswerLost()  # type: ignore[assignment]
        status = await runner.deliver("ann", "one")
        store._rows = rows
        again = await runner.deliver("ann", "two")
    stored = await store.get("ann")
    assert stored is not None
    assert (status.state, again.last_seq, stored.last_seq, stored.lease_owner) == (
        "waiting_for_reply", stored.last_seq, stored.last_seq, None,
    )  # fmt: skip
    assert channel.texts() == ["1: one", "2: two"]


# -- stores on clients the application already has -------------------------------------------


async def test_a_pymongo_client_it_was_given_stays_open(mongodb_url: str, clock: VirtualClock) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_url)
    try:
        store = MongoStore(client)  # the database named in the client's URL
        assert store.database.name == mongodb_url.rsplit("/", 1)[1]
        async with Runner(store, clock=clock) as runner:
            await runner.start(greeter, "ann", "Ann")
        await store.close()
        assert await client[store.database.name]["events"].count_documents({}) == 4  # started, sent, waiting, delivered
    finally:
        await client.close()


async def test_a_motor_database_it_was_given_serves_a_conversation(mongodb_uri: str, clock: VirtualClock) -> None:
    from motor.motor_asyncio import AsyncIOMotorClient

    client = AsyncIOMotorClient(mongodb_uri)
    try:
        store = MongoStore(client, "motor_app")
        await store.database["events"].drop()
        await store.database["conversations"].drop()
        channel = ListChannel()
        async with Runner(store, channel, clock=clock) as runner:
            await runner.start(greeter, "ann", "Ann")
            await runner.deliver("ann", "fine")
        await store.close()
        assert await client["motor_app"]["events"].count_documents({"conversation_id": "ann"}) > 3  # still open
        assert channel.texts() == ["Hi Ann! How did you sleep?", "Noted: fine."]
    finally:
        client.close()


# -- the runner on MongoDB ----------------------------------------------------------------------


async def test_conversation_with_timers_survives_a_restart_on_a_new_store(
    mongodb_url: str, clock: VirtualClock
) -> None:
    channel = ListChannel()
    first = await open_store(mongodb_url)
    async with Runner(first, channel, clock=clock) as runner:
        await runner.start(greeter, "ann", "Ann")
        clock.advance(timedelta(hours=2, seconds=1))
        await runner.run_due()  # the wait times out
    await first.close()

    clock.advance(timedelta(hours=22))  # past tomorrow 9:00: the morning message is due
    second = await open_store(mongodb_url)  # a new process, in effect: nothing cached
    async with Runner(second, channel, clock=clock, cache_size=0) as runner:
        assert await runner.run_due() == 1
        status = await runner.deliver("ann", "ready")
        transcript = [(entry.direction, entry.text) for entry in await runner.transcript("ann")]
    await second.close()
    assert (status.state, status.result) == ("completed", "ready")
    assert transcript == [
        ("out", "Hi Ann! How did you sleep?"), ("out", "No answer, fine."), ("out", "Good morning!"), ("in", "ready"),
    ]  # fmt: skip
    assert channel.texts() == [text for direction, text in transcript if direction == "out"]


async def test_write_lost_on_the_network_after_the_server_applied_it_is_not_repeated(
    store: MongoStore, clock: VirtualClock
) -> None:
    """The insert went through but its answer was lost: the retry finds our events there and goes on."""
    events = store._events

    class AnswerLost:
        def __init__(self) -> None:
            self.lost = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(events, name)

        async def insert_many(self, docs: list[dict[str, Any]], **kwargs: Any) -> Any:
            await events.insert_many(docs, **kwargs)
            if self.lost < 2:
                self.lost += 1
                raise AutoReconnect("connection reset after the write (injected)")

    store._events = AnswerLost()  # type: ignore[assignment]
    channel = ListChannel()
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(greeter, "ann", "Ann")
        await runner.deliver("ann", "fine")
    store._events = events
    log = await store.load("ann")
    assert [event.seq for event in log] == list(range(1, len(log) + 1))
    assert [event.text for event in log if isinstance(event, ReplyReceived)] == ["fine"]
    assert channel.texts() == ["Hi Ann! How did you sleep?", "Noted: fine."]


# -- outages ---------------------------------------------------------------------------------


@dialog(name="mongo-test-counter")
async def counter():  # type: ignore[no-untyped-def]
    count = 0
    while True:
        reply = yield wait_for_reply()
        count += 1
        yield send(f"{count}: {reply.text}")


@pytest.fixture
def own_server(mongodb_server_factory: Callable[[], Any]) -> Any:
    """A server of this test's own, which it may kill and start again."""
    server = mongodb_server_factory()
    if not server.can_restart:
        pytest.skip("DYNAPROMPT_TEST_MONGODB_URI names a server these tests cannot restart")
    return server


async def test_server_killed_and_restarted_loses_no_acknowledged_reply(own_server: Any, clock: VirtualClock) -> None:
    url = f"{own_server.uri}/outage"
    store = await open_store(url, server_selection_timeout=0.3, retries=2, retry_backoff=0.05)
    channel = ListChannel()
    acknowledged: list[str] = []
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(counter, "c")
        for text in ("one", "two", "three"):
            await runner.deliver("c", text)
            acknowledged.append(text)

        await anyio.to_thread.run_sync(own_server.kill)  # SIGKILL: no clean shutdown
        with pytest.raises(StoreUnavailableError, match="outage"):
            await runner.deliver("c", "lost in the outage")  # fails loudly: not acknowledged

        await anyio.to_thread.run_sync(own_server.start)  # same data folder, same port
        await runner.deliver("c", "four")
        acknowledged.append("four")
        heard = [entry.text for entry in await runner.transcript("c") if entry.direction == "in"]
    await store.close()
    assert [text for text in heard if text in acknowledged] == acknowledged  # each once, in order
    assert set(heard) - set(acknowledged) <= {"lost in the outage"}  # it may have landed before the kill
    assert channel.texts()[-1] == f"{len(heard)}: four"


async def test_deliver_during_a_short_outage_waits_for_the_server_and_succeeds(
    own_server: Any, clock: VirtualClock
) -> None:
    url = f"{own_server.uri}/blip"
    store = await open_store(url, server_selection_timeout=0.5, retries=8, retry_backoff=0.1)
    async with Runner(store, clock=clock) as runner:
        await runner.start(counter, "c")
        await runner.deliver("c", "before")
        await anyio.to_thread.run_sync(own_server.stop)
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, own_server.start)  # back while deliver() retries
            status = await runner.deliver("c", "during")
        heard = [entry.text for entry in await runner.transcript("c") if entry.direction == "in"]
    await store.close()
    assert status.state == "waiting_for_reply"
    assert heard == ["before", "during"]


# -- the command line ---------------------------------------------------------------------------


async def test_cli_takes_a_mongodb_store_url(store: MongoStore, mongodb_url: str, clock: VirtualClock) -> None:
    async with Runner(store, clock=clock) as runner:
        await runner.start(greeter, "ann", "Ann")
    listed = await anyio.run_process([sys.executable, "-m", "dynaprompt.cli", "ls", "--store", mongodb_url, "--json"])
    assert b'"ann"' in listed.stdout
    dead = f"mongodb://127.0.0.1:{free_port()}/bot?serverSelectionTimeoutMS=200"
    refused = await anyio.run_process(
        [sys.executable, "-m", "dynaprompt.cli", "ls", "--store", dead], check=False, stderr=subprocess.PIPE
    )
    assert refused.returncode == 2
    assert f"store {dead} is unavailable" in refused.stderr.decode()
