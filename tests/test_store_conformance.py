"""Every store passes ``dynaprompt.testing.check_store``; and the check fails stores that break a promise.

Adding a store leg (the MongoDB one, say) is one entry in ``STORE_LEGS``: a
function from the pytest request to a factory of new, empty stores. It may
pull fixtures lazily with ``request.getfixturevalue`` so the other legs do not
start a server::

    async def _mongodb(request: pytest.FixtureRequest) -> StoreFactory:
        uri = request.getfixturevalue("mongodb_uri")  # e.g. a session fixture in conftest.py

        async def make() -> Store:
            return await open_store(f"{uri.rstrip('/')}/conformance_{uuid.uuid4().hex}")

        return make

    STORE_LEGS["mongodb"] = _mongodb
"""

from __future__ import annotations

import typing
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from dynaprompt import Store, open_store
from dynaprompt.events import Event
from dynaprompt.stores.base import ConversationRow, RowUpdate
from dynaprompt.stores.memory import MemoryStore
from dynaprompt.testing import check_store
from dynaprompt.testing.conformance import StoreFactory, every_event_kind

pytestmark = pytest.mark.anyio


async def _memory(request: pytest.FixtureRequest) -> StoreFactory:
    async def make() -> Store:
        return await open_store("memory://")

    return make


async def _sqlite(request: pytest.FixtureRequest) -> StoreFactory:
    folder: Path = request.getfixturevalue("tmp_path")

    async def make() -> Store:
        return await open_store(f"sqlite:///{folder}/{uuid.uuid4().hex}.db")

    return make


async def _mongodb(request: pytest.FixtureRequest) -> StoreFactory:
    uri: str = request.getfixturevalue("mongodb_uri")

    async def make() -> Store:
        return await open_store(f"{uri}/conformance_{uuid.uuid4().hex}")

    return make


async def _mongodb_motor(request: pytest.FixtureRequest) -> StoreFactory:
    """The MongoDB store on a motor client the application already had (the store must not close it)."""
    from motor.motor_asyncio import AsyncIOMotorClient

    from dynaprompt.stores.mongo import MongoStore

    client = AsyncIOMotorClient(request.getfixturevalue("mongodb_uri"))
    request.addfinalizer(client.close)

    async def make() -> Store:
        return MongoStore(client[f"conformance_{uuid.uuid4().hex}"])

    return make


STORE_LEGS: dict[str, Callable[[pytest.FixtureRequest], Awaitable[StoreFactory]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "mongodb": _mongodb,
    "mongodb-motor": _mongodb_motor,
}


@pytest.fixture(params=sorted(STORE_LEGS))
async def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """A factory of new, empty stores of one kind (one param per entry of ``STORE_LEGS``)."""
    return await STORE_LEGS[request.param](request)


async def test_store_conforms(store_factory: StoreFactory) -> None:
    await check_store(store_factory)


def test_the_suite_writes_every_event_kind() -> None:
    """A new event kind must be added to the round trip, or stores could drop it unnoticed."""
    union = typing.get_args(typing.get_args(Event)[0])
    kinds = {cls.model_fields["kind"].default for cls in union}
    assert {event.kind for event in every_event_kind()} == kinds


# -- the check itself fails broken stores ------------------------------------------------


class AppendsOverTakenSeqs(MemoryStore):
    """Never refuses a sequence number: the second writer overwrites the first."""

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        log = self._events[conversation_id]
        for event in events:
            del log[event.seq - 1 :]
            log.append(event)
        row = update.apply(self._rows[conversation_id], len(log), now)
        self._rows[conversation_id] = row
        return row


class UpdatesRowBeforeCheckingSeqs(MemoryStore):
    """Refuses the taken seq, but only after it has changed the row: not atomic."""

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        self._rows[conversation_id] = update.apply(
            self._rows[conversation_id], self._rows[conversation_id].last_seq, now
        )
        return await super().append(conversation_id, events, update, now)


class ChecksThenWrites(AppendsOverTakenSeqs):
    """Checks the sequence number, then awaits before writing: concurrent writers all pass the check."""

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        self._check_seqs(conversation_id, len(self._events[conversation_id]), events)
        await anyio.lowlevel.checkpoint()
        return await super().append(conversation_id, events, update, now)


class ReleasesAnyOwnersLease(MemoryStore):
    """Drops the lease on ``RowUpdate.release_owner`` whoever holds it: another runner's claim is lost."""

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        row = await super().append(conversation_id, events, update, now)
        if update.release_owner is not None:
            row = row.model_copy(update={"lease_owner": None, "lease_until": None})
            self._rows[conversation_id] = row
        return row


class ReleasesWhateverTheLog(MemoryStore):
    """Ignores ``last_seq`` on release, so a reply appended meanwhile could be stranded."""

    async def release(self, conversation_id: str, owner: str, last_seq: int | None) -> bool:
        return await super().release(conversation_id, owner, None)


class ListsLeasedAsDue(MemoryStore):
    """Hands out conversations another runner is advancing."""

    async def due(self, now: datetime, limit: int) -> list[str]:
        rows = [row for row in self._rows.values() if row.needs_advance or (row.wake_at and row.wake_at <= now)]
        return [row.id for row in rows][:limit]


class TakesLeasesInBulkRegardless(MemoryStore):
    """Takes every lease it is asked for in bulk, live ones too: two runners would advance one conversation."""

    async def acquire_many(self, conversation_ids: list[str], owner: str, until: datetime, now: datetime) -> list[str]:
        taken = [conversation_id for conversation_id in conversation_ids if conversation_id in self._rows]
        for conversation_id in taken:
            self._rows[conversation_id] = self._rows[conversation_id].model_copy(
                update={"lease_owner": owner, "lease_until": until}
            )
        return taken


class StealsLiveLeases(MemoryStore):
    """Takes a lease whoever holds it."""

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        row = self._rows.get(conversation_id)
        if row is None:
            return None
        row = row.model_copy(update={"lease_owner": owner, "lease_until": until})
        self._rows[conversation_id] = row
        return row


class ReturnsUnvalidatedEvents(MemoryStore):
    """Returns events as raw dicts instead of validated models."""

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Event]:
        events = await super().load(conversation_id, after_seq)
        return [typing.cast(Event, event.model_dump()) for event in events]


class ForgetsClear(MemoryStore):
    """Ignores ``RowUpdate.clear``, so a finished timer would fire forever."""

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        return await super().append(conversation_id, events, update.model_copy(update={"clear": frozenset()}), now)


class IgnoresClaims(MemoryStore):
    """Takes the lease of a claimed append without checking the row: a stale runner writes over a live lease."""

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        log = self._events[conversation_id]
        self._check_seqs(conversation_id, len(log), events)
        log.extend(events)
        row = self._rows[conversation_id] = update.apply(self._rows[conversation_id], len(log), now)
        return row


class MixesUpLogs(MemoryStore):
    """Reads logs together, but hands each conversation the log of the one asked for first."""

    async def load_logs(self, conversation_ids: list[str]) -> dict[str, list[Event]]:
        first = await self.load(conversation_ids[0]) if conversation_ids else []
        return dict.fromkeys(conversation_ids, first)


class HidesLeases(MemoryStore):
    """Says no row holds a lease (a runner's first pass would never take over a dead process's)."""

    async def leased(self) -> list[ConversationRow]:
        return []


class CreatesOverExisting(MemoryStore):
    """Replaces a conversation that exists instead of refusing the id."""

    async def create(self, row: ConversationRow, events: list[Event]) -> None:
        self._rows.pop(row.id, None)
        await super().create(row, events)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (AppendsOverTakenSeqs, "expected ConflictError, nothing was raised"),
        (UpdatesRowBeforeCheckingSeqs, "the row after a conflicting append"),
        (ChecksThenWrites, "by 8 concurrent writers that succeeded"),
        (ReleasesAnyOwnersLease, "append(release_owner=<not the holder>)"),
        (ReleasesWhateverTheLog, "release() when the log does not end at last_seq"),
        (ListsLeasedAsDue, "the ids due() returns"),
        (StealsLiveLeases, "acquire() of a lease another owner holds"),
        (TakesLeasesInBulkRegardless, "the ids taken (free or expired at now"),
        (ReturnsUnvalidatedEvents, "not a validated"),
        (ForgetsClear, "RowUpdate.clear"),
        (CreatesOverExisting, "create() of an id that exists"),
        (IgnoresClaims, "append(claim) while another owner's lease is live"),
        (MixesUpLogs, "load_logs() of a conversation read with others"),
        (HidesLeases, "leased() after acquire()"),
    ],
)
async def test_check_store_fails_a_broken_store(broken: type[MemoryStore], message: str) -> None:
    async def make() -> Store:
        return broken()

    with pytest.raises(AssertionError, match="fails check_store") as failure:
        await check_store(make)
    assert message in str(failure.value)


async def test_check_store_names_the_store_and_the_values() -> None:
    async def make() -> Store:
        return AppendsOverTakenSeqs("memory://broken")

    with pytest.raises(AssertionError) as failure:
        await check_store(make)
    assert str(failure.value).startswith("store 'memory://broken' fails check_store (append() with RowUpdate):")
