"""``mongodb://host:port/dbname``: the production store, shared by any number of runner processes.

Three collections, plain BSON data, one document per event (no unbounded arrays):

* ``events``: ``{conversation_id, seq, kind, at, ...}``, the event's JSON fields; unique on
  ``(conversation_id, seq)``, which is what makes one writer win a sequence number.
* ``conversations``: one index document per conversation, ``_id`` = conversation id.
* ``schedules``: one document per schedule, ``_id`` = schedule id.

Instants the store queries (``wake_at``, ``lease_until``, ``next_at``, ``updated_at``) are
int64 microseconds since the Unix epoch: exact and ordered, where a BSON date keeps only
milliseconds. Event times stay ISO strings inside the event.

No multi-document transactions (a standalone server has none). An append is an ordered
``insert_many`` of the events followed by one update of the conversation document; a crash
between the two leaves a valid prefix of the log and a stale row, which :meth:`MongoStore.get`
repairs from the log (the log is the truth, the row an index rebuilt from it). Leases change
through updates with a filter: an atomic single-document compare-and-set. The row write of an
append the runner marks ``provisional`` (the one before a hand-off) is put off to the next write of
the conversation, so a warm turn is 4 writes: claim, events, delivered marks, row (see
``docs/production.md``). The claim and the row write that drops the lease are not journaled: the
events insert after the claim flushes it, and a lost last row write leaves the row as the claim did.

The row update of an append is an ``update_one`` whose filter holds every field the update leaves
alone, as this store last saw them: when it matches, the new row is known without reading it back
(no ``find_one_and_update``, no validation of a document read back); when it misses (another writer
changed the row), the update is made as before and the row read back.

Network failures are retried with backoff a bounded number of times, for reads and for writes
whose outcome can be checked (an event insert re-reads which of its sequence numbers hold our
events before trying again); then :class:`~dynaprompt.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, WriteConcern
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError, PyMongoError

from dynaprompt.errors import ConflictError, NotJSONError, StoreError, StoreUnavailableError
from dynaprompt.events import Event, Started, event_from_dict
from dynaprompt.models import State
from dynaprompt.stores import mask
from dynaprompt.stores.base import Claim, ConversationRow, RowUpdate, ScheduleRow

__all__ = ["MongoStore"]

T = TypeVar("T")
Document = dict[str, Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_ROW_UPDATE_FIELDS = (
    "dialog", "state", "wake_at", "run", "run_seq", "result", "error", "parked", "needs_advance", "tz",
)  # fmt: skip
_STATE_FIELDS = frozenset({"state", "wake_at", "result", "error", "parked", "needs_advance"})
_SEEN_LIMIT = 4096  # rows remembered per store for _swap_row (a hint: a miss costs one read-back)
_UNKNOWN = object()  # a write check that could not tell whether the write happened


def _stamp(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def _us(value: datetime | None) -> int | None:
    return None if value is None else _stamp(value)


def _dt(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + value * _MICROSECOND


@dataclass(frozen=True, slots=True)
class _Deferred:
    """The row write of an append put off to the conversation's next write (see ``RowUpdate.provisional``)."""

    first_seq: int  # the events it covers
    last_seq: int
    row: ConversationRow  # the row once written
    changes: Document  # the fields to set
    now: datetime


def _lease_free(now: int) -> Document:
    """No lease, or one expired by ``now``: one clause on ``lease_until`` (null or not past ``now``), not a
    top-level ``$or``, which a server may plan as a scan of the whole collection (SecantusDB does)."""
    return {"lease_until": {"$not": {"$gt": now}}}


class MongoStore:
    """An event log in a MongoDB database (replica set, sharded cluster, or standalone).

    Open it by URL, which also creates the indexes::

        store = await open_store("mongodb://db1,db2,db3/bot?replicaSet=rs0")

    or hand it a client or database you already have (pymongo's ``AsyncMongoClient`` or
    ``AsyncDatabase``, or motor's ``AsyncIOMotorClient``/``AsyncIOMotorDatabase``); the
    indexes are then created on first use, and the store never closes what it was given::

        store = MongoStore(motor_client, "bot")

    Options (keyword-only, also accepted by ``open_store``):

    * ``server_selection_timeout``: seconds to wait for a server on each attempt (5.0;
      ``serverSelectionTimeoutMS`` in the URL wins). An unreachable server at open raises
      ``StoreUnavailableError`` naming the URL, password masked, after this long.
    * ``retries``: how many times an operation that failed on the network is tried again (5).
    * ``retry_backoff``: the first pause between tries in seconds, doubled each time (0.1).
    """

    def __init__(
        self,
        database_or_client: Any,
        database_name: str | None = None,
        *,
        url: str | None = None,
        retries: int = 5,
        retry_backoff: float = 0.1,
        owns_client: bool = False,
    ) -> None:
        # Look on the type: motor's objects answer any attribute name with a collection or database.
        if hasattr(type(database_or_client), "get_default_database"):  # a client, pymongo's or motor's
            client = database_or_client
            if database_name is None:
                try:
                    database_name = str(client.get_default_database().name)
                except PyMongoError:  # the client's URL names no database
                    database_name = "dynaprompt"
            database = client[database_name]
        else:
            database = database_or_client
            client = database.client
        self.database = database
        self.url = url or f"mongodb://{_seeds(client)}/{database.name}"
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._client = client
        self._owns_client = owns_client
        # An acknowledged write must survive the server being killed: journaled unless the client or URL chose
        # a write concern of its own (w=majority on a replica set journals too, by the server's default).
        concern = database.write_concern
        # Two row writes need not wait for the journal (with the server's default concern; a concern of the
        # client's own applies to them too):
        # * a claim: the events insert that follows it in the same append does (on one server the journal is
        #   sequential, so that flush covers the claim); a claim lost with the server is a lease lost, which the
        #   unique (conversation_id, seq) index makes harmless;
        # * the row write of an advance's last append, the one that drops the lease: its events are journaled
        #   before it, and if the server loses it the row is as the claim left it (journaled by those events):
        #   leased, last_seq behind the log. The holder takes it back at once (the lease is its own); another
        #   runner once the lease expires, and its get() sees the events past last_seq and replays them.
        #   Nothing acknowledged is lost: every event of the turn is in the journal; only the index lags.
        self._rows_unjournaled = database.get_collection("conversations")
        if concern.is_server_default:
            concern = WriteConcern(j=True)
        self._events = database.get_collection("events", write_concern=concern)
        self._rows = database.get_collection("conversations", write_concern=concern)
        self._schedules = database.get_collection("schedules", write_concern=concern)
        self._indexed = False
        self._seen: OrderedDict[str, ConversationRow] = OrderedDict()
        self._claimed_ahead: OrderedDict[str, str] = OrderedDict()  # taken by acquire_many: id -> owner
        self._deferred: dict[str, _Deferred] = {}  # row writes put off to the conversation's next write

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        server_selection_timeout: float = 5.0,
        retries: int = 5,
        retry_backoff: float = 0.1,
        **client_options: Any,
    ) -> MongoStore:
        """Connect to ``url``, check a server answers, and create the indexes."""
        if "serverselectiontimeoutms" not in url.lower():
            client_options.setdefault("serverSelectionTimeoutMS", int(server_selection_timeout * 1000))
        try:
            client: AsyncMongoClient[Document] = AsyncMongoClient(url, tz_aware=True, **client_options)
        except PyMongoError as exc:
            raise StoreUnavailableError(mask(url), f"bad URL or option: {exc}") from exc
        store = cls(client, None, url=url, retries=retries, retry_backoff=retry_backoff, owns_client=True)
        try:
            await client.admin.command("ping")
            await store._ensure_indexes()
        except ConnectionFailure as exc:
            await client.close()
            timeout = client_options.get("serverSelectionTimeoutMS", "the URL's serverSelectionTimeoutMS")
            raise StoreUnavailableError(
                mask(url), f"no server answered (waited {timeout} ms): {type(exc).__name__}"
            ) from exc
        return store

    async def _ensure_indexes(self) -> None:
        if self._indexed:
            return
        await self._events.create_index([("conversation_id", ASCENDING), ("seq", ASCENDING)], unique=True)
        await self._rows.create_index([("wake_at", ASCENDING)])
        await self._rows.create_index([("needs_advance", ASCENDING), ("lease_until", ASCENDING)])
        await self._rows.create_index([("lease_until", ASCENDING)])
        await self._schedules.create_index([("next_at", ASCENDING)])
        self._indexed = True

    async def _retry(
        self, what: str, operation: Callable[[], Awaitable[T]], check: Callable[[], Awaitable[object]] | None = None
    ) -> T:
        """Run ``operation``; on a network failure pause and run it again, at most ``retries`` times.

        ``check`` (for writes that are not idempotent) runs before each retry and returns the
        operation's result if the failed attempt was in fact applied, else ``_UNKNOWN``.
        """
        failure: ConnectionFailure | None = None
        for attempt in range(self.retries + 1):
            try:
                if not self._indexed:
                    await self._ensure_indexes()
                if failure is not None and check is not None:
                    done = await check()
                    if done is not _UNKNOWN:
                        return done  # type: ignore[return-value]
                return await operation()
            except ConnectionFailure as exc:
                failure = exc
                if attempt < self.retries:
                    await anyio.sleep(self.retry_backoff * 2**attempt)
            except (InvalidDocument, OverflowError) as exc:
                raise NotJSONError(f"a value to store in MongoDB ({what})", str(exc)) from exc
            except DuplicateKeyError:
                raise
            except PyMongoError as exc:
                if isinstance(exc, BulkWriteError):
                    raise
                raise StoreError(f"store {mask(self.url)}: {what} failed: {exc}") from exc
        raise StoreUnavailableError(
            mask(self.url), f"{what} failed {self.retries + 1} times: {type(failure).__name__}: {failure}"
        ) from failure

    # -- conversations ---------------------------------------------------------------

    async def get(self, conversation_id: str) -> ConversationRow | None:
        """The row, reconciled with the log: if events lie past its ``last_seq`` (a writer
        died between its two writes), the row says so (``needs_advance``) and is fixed in place."""
        if conversation_id in self._deferred:
            await self._write_deferred(conversation_id)

        async def read() -> tuple[Document | None, Document | None]:
            found: tuple[Document | None, Document | None] = await asyncio.gather(
                self._rows.find_one({"_id": conversation_id}),
                self._events.find_one(
                    {"conversation_id": conversation_id}, {"seq": 1, "_id": 0}, sort=[("seq", DESCENDING)]
                ),
            )
            return found

        found, top = await self._retry("get", read)
        if found is None:
            return None if top is None else await self._rebuild(conversation_id)
        row = self._saw(_row(found))
        if top is not None and top["seq"] > row.last_seq:
            self._seen.pop(conversation_id, None)
            row = row.model_copy(update={"last_seq": top["seq"], "needs_advance": True})
            await self._retry(
                "repair",
                lambda: self._rows.update_one(
                    {"_id": conversation_id, "last_seq": {"$lt": top["seq"]}},
                    {"$set": {"needs_advance": True}, "$max": {"last_seq": top["seq"]}},
                ),
            )
        return row

    async def _rebuild(self, conversation_id: str) -> ConversationRow | None:
        """A log without a row (its creator died between the two writes): rebuild the row from the
        latest ``started`` event, flagged for a runner to replay and set its true state."""
        started_doc, top = await self._retry(
            "rebuild",
            lambda: asyncio.gather(
                self._events.find_one(
                    {"conversation_id": conversation_id, "kind": "started"}, sort=[("seq", DESCENDING)]
                ),
                self._events.find_one({"conversation_id": conversation_id}, sort=[("seq", DESCENDING)]),
            ),
        )
        if started_doc is None or top is None:
            return None
        started = _event(conversation_id, started_doc)
        assert isinstance(started, Started)
        row = ConversationRow(
            id=conversation_id, dialog=started.dialog, last_seq=top["seq"], run=started.run,
            run_seq=started.seq, needs_advance=True, updated_at=started.at, tz=started.tz,
        )  # fmt: skip
        try:
            await self._retry("rebuild", lambda: self._rows.insert_one(_row_doc(row, row.last_seq)))
        except DuplicateKeyError:
            pass  # rebuilt by someone else meanwhile: theirs is as good
        return await self.get(conversation_id)

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Event]:
        docs: list[Document] = await self._retry(
            "load",
            lambda: (
                self._events.find(
                    {"conversation_id": conversation_id, "seq": {"$gt": after_seq}}, {"_id": 0, "conversation_id": 0}
                )
                .sort("seq", ASCENDING)
                .to_list(None)
            ),
        )
        return [_event(conversation_id, doc) for doc in docs]

    async def load_logs(self, conversation_ids: list[str]) -> dict[str, list[Event]]:
        """One query for every log, on the (conversation_id, seq) index."""
        docs: list[Document] = await self._retry(
            "load_logs",
            lambda: (
                self._events.find({"conversation_id": {"$in": conversation_ids}}, {"_id": 0})
                .sort([("conversation_id", ASCENDING), ("seq", ASCENDING)])
                .to_list(None)
            ),
        )
        logs: dict[str, list[Event]] = {conversation_id: [] for conversation_id in conversation_ids}
        for doc in docs:
            conversation_id = doc["conversation_id"]
            logs[conversation_id].append(_event(conversation_id, doc))
        return logs

    async def create(self, row: ConversationRow, events: list[Event]) -> None:
        # Events first: a crash before the row is written leaves a log that get() rebuilds a row from;
        # the other order would leave a row with no log, which nothing could repair.
        last_seq = events[-1].seq if events else 0
        await self._insert_events(row.id, events)
        doc = _row_doc(row, last_seq)
        try:
            await self._retry("create", lambda: self._rows.insert_one(dict(doc)), self._same_doc(self._rows, doc))
        except DuplicateKeyError as exc:
            raise ConflictError(row.id, events[0].seq if events else 1) from exc
        self._saw(row if row.last_seq == last_seq else row.model_copy(update={"last_seq": last_seq}))

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        """Insert the events (ordered; a duplicate sequence number raises ``ConflictError`` and
        stops there), then update the row in one atomic write; the new row.

        If another writer took a later sequence number after reading events of ours that were
        already in, those stay (they are a valid prefix the other writer built on).

        A claim is one more write, first: without a multi-document transaction the lease must be ours
        before the events go in, or a runner holding it could find its work overtaken.

        A ``provisional`` update's row write is put off (when this store knows the row it applies to) and
        made with the conversation's next write: the next append carries it in its own row update, any other
        use of the row (``get``, ``acquire``, ``release``, the queries over all rows, ``close``) makes it
        first. A warm turn is then 4 writes, not 5."""
        deferred = self._deferred.get(conversation_id)
        if deferred is not None and (update.claim is not None or not events or events[0].seq != deferred.last_seq + 1):
            await self._write_deferred(conversation_id)  # not this write's to carry
            deferred = None
        if update.claim is not None:
            await self._claim(conversation_id, update.claim, events[0].seq if events else update.claim.last_seq + 1)
        await self._insert_events(conversation_id, events)
        changes: Document = {"updated_at": _us(now)}
        for name in _ROW_UPDATE_FIELDS:
            value = getattr(update, name)
            if value is not None or name in update.clear:
                changes[name] = _us(value) if name == "wake_at" else value
        if deferred is not None:  # this write carries the row write put off before it (see RowUpdate.provisional)
            self._deferred.pop(conversation_id, None)  # (if another task made it meanwhile, the swap misses)
            changes = {**deferred.changes, **changes}
        first_seq = deferred.first_seq if deferred is not None else events[0].seq if events else 0
        base = deferred.row if deferred is not None else self._seen.get(conversation_id)
        if (
            update.provisional and events and update.release_owner is None and base is not None
            and base.last_seq == events[0].seq - 1 and _STATE_FIELDS <= changes.keys()
        ):  # fmt: skip
            # Put the row write off to the next write of this conversation: the runner's hand-off append follows.
            row = update.apply(base, events[-1].seq, now)
            self._deferred[conversation_id] = _Deferred(first_seq, events[-1].seq, row, changes, now)
            return row
        last_seq = events[-1].seq if events else None
        return await self._write_row(conversation_id, first_seq, last_seq, update, changes, base, now)

    async def _write_deferred(self, conversation_id: str) -> None:
        """Make the row write an append put off (see ``RowUpdate.provisional``), before any other use of the row."""
        deferred = self._deferred.pop(conversation_id, None)
        if deferred is None:
            return
        try:
            # RowUpdate(): deferred.row already holds the changes (applying it again only sets last_seq, updated_at)
            written = await self._swap_row(
                conversation_id, deferred.first_seq, deferred.last_seq, RowUpdate(), deferred.changes, deferred.row,
                deferred.now,
            )  # fmt: skip
            if written is None:
                # Guarded by last_seq only: a row already past these events was written by someone who read them
                # (a later write of ours, or a reply appended after them that flags the row itself): keep it.
                await self._retry(
                    "append",
                    lambda: self._rows.update_one(
                        {"_id": conversation_id, "last_seq": {"$lte": deferred.last_seq}},
                        {"$set": deferred.changes, "$max": {"last_seq": deferred.last_seq}},
                    ),
                )
        except BaseException:
            self._deferred.setdefault(conversation_id, deferred)  # made by the next use of the row, if any
            raise

    async def _write_all_deferred(self) -> None:
        for conversation_id in list(self._deferred):
            await self._write_deferred(conversation_id)

    async def _write_row(
        self,
        conversation_id: str,
        first_seq: int,
        last_seq: int | None,
        update: RowUpdate,
        changes: Document,
        base: ConversationRow | None,
        now: datetime,
    ) -> ConversationRow:
        """The row write of an append of events ``first_seq..last_seq`` (None: no events); ``base`` is the row
        as it was before them, as this store believes (a hint)."""
        if last_seq is not None and base is not None:
            written = await self._swap_row(conversation_id, first_seq, last_seq, update, changes, base, now)
            if written is not None:
                return written
        operation: Document = {"$set": changes}
        # The row update is a separate write, so another writer may have appended past our events in
        # between (a reply made durable without the lease). Each attempt below is guarded so that it
        # never hides such events: the first that matches wins; usually the first does.
        attempts: list[tuple[Document, Document]] = []
        if last_seq is not None:
            operation["$max"] = {"last_seq": last_seq}
            guard: Document = {"_id": conversation_id, "last_seq": {"$lte": last_seq}}
            owner = update.release_owner
            if owner is not None:  # drop the lease with this write if we hold it and nothing came after us
                released = {**changes, "lease_owner": None, "lease_until": None}
                attempts.append(({**guard, "lease_owner": owner}, {**operation, "$set": released}))
            attempts.append((guard, operation))
            # Overtaken: keep our facts but leave the conversation flagged, lease held, for what came after.
            attempts.append(({"_id": conversation_id}, {**operation, "$set": {**changes, "needs_advance": True}}))
        else:
            # No events, so no sequence number to guard on: never release here (the runner then releases
            # with release(last_seq), which checks the log did not move).
            attempts.append(({"_id": conversation_id}, operation))
        found: Document | None = None
        for query, change in attempts:
            found = await self._retry(
                "append",
                lambda query=query, change=change: self._rows.find_one_and_update(  # type: ignore[misc]
                    query, change, return_document=ReturnDocument.AFTER
                ),
            )
            if found is not None:
                break
        if found is None:
            from dynaprompt.errors import UnknownConversationError

            raise UnknownConversationError(conversation_id)
        return self._saw(_row(found))

    async def _swap_row(
        self,
        conversation_id: str,
        first_seq: int,
        last_seq: int,
        update: RowUpdate,
        changes: Document,
        base: ConversationRow,
        now: datetime,
    ) -> ConversationRow | None:
        """The row update of an append as a compare-and-swap on the row this store last saw: the new row, or
        None when the store has not seen the row or it changed meanwhile (then ``append`` reads it back).

        When every field the update leaves alone is still what this store saw (the filter says so), the new
        document is known without reading it: ``update_one`` instead of ``find_one_and_update``, and no
        validation of a document read back. Only for updates that set every state field (an advance's
        flush does), so the filter compares scalars only, never a dialog's JSON result. ``base`` is the row
        the update applies to: what this store saw, or that with a row write put off since applied.
        """
        seen = self._seen.get(conversation_id)
        if seen is None or seen.last_seq != first_seq - 1 or not _STATE_FIELDS <= changes.keys():
            return None
        # run, dialog and tz change only with run_seq (a new run, whose Started event moves last_seq too): checking
        # run_seq covers them, and each field fewer is an index lookup fewer for a planner that tries one per field.
        query: Document = {
            "_id": conversation_id, "last_seq": seen.last_seq, "run_seq": seen.run_seq,
            "lease_owner": seen.lease_owner, "lease_until": _us(seen.lease_until),
        }  # fmt: skip
        row = update.apply(base, last_seq, now)
        change = {**changes, "last_seq": last_seq}
        if row.lease_owner is None and seen.lease_owner is not None:
            change["lease_owner"] = change["lease_until"] = None
        # The turn's last row write, dropping the lease, need not wait for the journal (see __init__).
        rows = self._rows_unjournaled if update.release_owner is not None and row.lease_owner is None else self._rows
        result = await self._retry("append", lambda: rows.update_one(query, {"$set": change}))
        if result.matched_count != 1:
            self._seen.pop(conversation_id, None)
            return None
        return self._saw(row)

    def _saw(self, row: ConversationRow) -> ConversationRow:
        """Remember ``row`` as this store's latest view of it (a hint for ``_swap_row``, checked there)."""
        self._seen.pop(row.id, None)
        self._seen[row.id] = row
        if len(self._seen) > _SEEN_LIMIT:
            del self._seen[next(iter(self._seen))]
        return row

    async def _claim(self, conversation_id: str, claim: Claim, seq: int) -> None:
        """Take the lease if the row is as the claim expects (see ``Claim``), else ``ConflictError``."""
        # The lease free or expired is one clause on lease_until ($not $gt: null or past), our own lease a second
        # try: no top-level $or, which a server may plan as a scan of every conversation (SecantusDB does) where
        # an equality on _id is a point lookup. The flags are $ne true, which leaves the planner nothing to look
        # up an index for. Usually the first try matches: the lease is free between turns.
        query: Document = {
            "_id": conversation_id, "last_seq": claim.last_seq, "run_seq": claim.run_seq,
            "needs_advance": {"$ne": True}, "parked": {"$ne": True}, "lease_until": {"$not": {"$gt": _us(claim.now)}},
        }  # fmt: skip
        ours = {**{name: value for name, value in query.items() if name != "lease_until"}, "lease_owner": claim.owner}
        taken = {"$set": {"lease_owner": claim.owner, "lease_until": _us(claim.until)}}
        # update_one, not find_one_and_update: the filter says all the runner needs to know. Retried after a
        # network failure, a claim that did land still matches (the lease is then ours), so it is idempotent.
        seen = self._seen.get(conversation_id)
        # Our own lease first when acquire_many took it (run_due claims what it wakes before replaying it).
        tries = (ours, query) if self._claimed_ahead.pop(conversation_id, None) == claim.owner else (query, ours)
        for attempt in tries:
            claimed = await self._retry(
                "append",
                lambda attempt=attempt: self._rows_unjournaled.update_one(attempt, taken),  # type: ignore[misc]
            )
            if claimed.matched_count == 1:
                break
        if claimed.matched_count != 1:
            self._seen.pop(conversation_id, None)
            raise ConflictError(conversation_id, seq)
        if seen is not None and (seen.last_seq, seen.run_seq) == (claim.last_seq, claim.run_seq):
            self._seen[conversation_id] = seen.model_copy(
                update={"lease_owner": claim.owner, "lease_until": claim.until, "parked": False, "needs_advance": False}
            )

    async def _insert_events(self, conversation_id: str, events: list[Event]) -> None:
        if not events:
            return
        docs = [_event_doc(conversation_id, event) for event in events]
        pending = list(docs)

        async def insert() -> None:
            await self._events.insert_many([dict(doc) for doc in pending], ordered=True)

        async def check() -> object:
            """After a network failure: which of our events are in? Insert only the rest next."""
            seqs = [doc["seq"] for doc in pending]
            stored = await self._events.find(
                {"conversation_id": conversation_id, "seq": {"$in": seqs}}, {"_id": 0}
            ).to_list(None)
            by_seq = {doc["seq"]: doc for doc in stored}
            while pending and pending[0]["seq"] in by_seq:
                if by_seq[pending[0]["seq"]] != pending[0]:
                    raise ConflictError(conversation_id, pending[0]["seq"])
                pending.pop(0)
            if any(doc["seq"] in by_seq for doc in pending):
                raise ConflictError(conversation_id, next(doc["seq"] for doc in pending if doc["seq"] in by_seq))
            return None if not pending else _UNKNOWN

        try:
            await self._retry("append", insert, check)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if errors and errors[0].get("code") == 11000:
                raise ConflictError(conversation_id, pending[errors[0].get("index", 0)]["seq"]) from exc
            raise StoreError(f"store {mask(self.url)}: append failed: {errors}") from exc

    def _same_doc(self, collection: Any, doc: Document) -> Callable[[], Awaitable[object]]:
        async def check() -> object:
            stored = await collection.find_one({"_id": doc["_id"]})
            return None if stored == doc else _UNKNOWN

        return check

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        if conversation_id in self._deferred:
            await self._write_deferred(conversation_id)
        owners = [owner] if steal_from is None else [owner, steal_from]
        taken = {"$set": {"lease_owner": owner, "lease_until": _us(until)}}
        # Free or expired first (the usual case), then held by us or by steal_from: two filters that each plan as
        # a lookup by _id, where one with a top-level $or may be planned as a scan (see _lease_free).
        queries: list[Document] = [
            {"_id": conversation_id, **_lease_free(_stamp(now))},
            {"_id": conversation_id, "lease_owner": {"$in": owners}},
        ]
        found = None
        for query in queries:
            found = await self._retry(
                "acquire",
                lambda query=query: self._rows.find_one_and_update(  # type: ignore[misc]
                    query, taken, return_document=ReturnDocument.AFTER
                ),
            )
            if found is not None:
                break
        return None if found is None else self._saw(_row(found))

    async def acquire_many(self, conversation_ids: list[str], owner: str, until: datetime, now: datetime) -> list[str]:
        if not conversation_ids:
            return []
        for conversation_id in conversation_ids:
            if conversation_id in self._deferred:
                await self._write_deferred(conversation_id)
        # Two commands for the lot: take what is free, then read which of them are ours until ``until``. An
        # update_many retried after it landed takes nothing more and the read still finds them ours.
        ids = {"_id": {"$in": conversation_ids}}
        until_us = _us(until)
        await self._retry(
            "acquire_many",
            lambda: self._rows.update_many(
                {**ids, **_lease_free(_stamp(now))}, {"$set": {"lease_owner": owner, "lease_until": until_us}}
            ),
        )
        docs = await self._retry(
            "acquire_many",
            lambda: self._rows.find({**ids, "lease_owner": owner, "lease_until": until_us}, {"_id": 1}).to_list(None),
        )
        taken = {doc["_id"] for doc in docs}
        for conversation_id in taken:
            seen = self._seen.get(conversation_id)
            if seen is not None:  # only the lease changed: what this store saw stays a good hint (see _swap_row)
                self._seen[conversation_id] = seen.model_copy(update={"lease_owner": owner, "lease_until": until})
            self._claimed_ahead[conversation_id] = owner  # _claim tries our own lease first
            if len(self._claimed_ahead) > _SEEN_LIMIT:
                del self._claimed_ahead[next(iter(self._claimed_ahead))]
        return [conversation_id for conversation_id in conversation_ids if conversation_id in taken]

    async def release(self, conversation_id: str, owner: str, last_seq: int | None) -> bool:
        if conversation_id in self._deferred:
            await self._write_deferred(conversation_id)
        query: Document = {"_id": conversation_id, "lease_owner": owner}
        if last_seq is not None:
            query["last_seq"] = last_seq
        dropped = {"$set": {"lease_owner": None, "lease_until": None}}

        async def check() -> object:
            # a retry after a release that did land would find the lease gone: that is success
            found = await self._rows.find_one({"_id": conversation_id})
            if found is None or found["lease_owner"] not in (None, owner):
                return False
            if last_seq is not None and found["last_seq"] != last_seq:
                return False
            return True if found["lease_owner"] is None else _UNKNOWN

        result = await self._retry("release", lambda: self._rows.update_one(query, dropped), check)
        released = result if isinstance(result, bool) else result.modified_count == 1
        seen = self._seen.pop(conversation_id, None)
        if released and seen is not None and seen.lease_owner == owner and last_seq in (None, seen.last_seq):
            self._saw(seen.model_copy(update={"lease_owner": None, "lease_until": None}))
        return released

    async def due(self, now: datetime, limit: int) -> list[str]:
        """Conversations needing attention (unconsumed input, a lease left to expire) first, then
        due timers soonest first; each query runs on an index."""
        if self._deferred:
            await self._write_all_deferred()
        stamp = _stamp(now)

        async def read() -> list[list[Document]]:
            found: list[list[Document]] = await asyncio.gather(
                self._rows.find({"needs_advance": True, **_lease_free(stamp)}, {"_id": 1}).limit(limit).to_list(None),
                self._rows.find({"lease_until": {"$lte": stamp}}, {"_id": 1}).limit(limit).to_list(None),
                self._rows.find({"wake_at": {"$lte": stamp}, **_lease_free(stamp)}, {"_id": 1})
                .sort("wake_at", ASCENDING)
                .limit(limit)
                .to_list(None),
            )
            return found

        flagged, expired, timers = await self._retry("due", read)
        ids = dict.fromkeys(doc["_id"] for doc in [*flagged, *expired, *timers])
        return list(ids)[:limit]

    async def next_wake_at(self, *, after: datetime | None = None) -> datetime | None:
        if self._deferred:
            await self._write_all_deferred()
        later: Document = {"$ne": None} if after is None else {"$gt": _stamp(after)}

        async def read() -> list[Document | None]:
            return list(
                await asyncio.gather(
                    self._rows.find_one({"wake_at": later}, {"wake_at": 1}, sort=[("wake_at", ASCENDING)]),
                    self._schedules.find_one({"next_at": later}, {"next_at": 1}, sort=[("next_at", ASCENDING)]),
                )
            )

        row, schedule = await self._retry("next_wake_at", read)
        times: list[int] = []
        if row is not None:
            times.append(row["wake_at"])
        if schedule is not None:
            times.append(schedule["next_at"])
        return _dt(min(times)) if times else None

    async def conversations(self, state: State | None = None) -> list[ConversationRow]:
        if self._deferred:
            await self._write_all_deferred()
        query = {} if state is None else {"state": state}
        docs = await self._retry("conversations", lambda: self._rows.find(query).sort("_id", ASCENDING).to_list(None))
        return [_row(doc) for doc in docs]

    async def leased(self) -> list[ConversationRow]:
        if self._deferred:
            await self._write_all_deferred()
        # Along the lease_until index: a row holds a lease exactly when it has a lease_until.
        query = {"lease_until": {"$ne": None}}
        docs = await self._retry("leased", lambda: self._rows.find(query).to_list(None))
        return [_row(doc) for doc in docs]

    # -- schedules ---------------------------------------------------------------------

    async def put_schedule(self, schedule: ScheduleRow) -> None:
        doc = _schedule_doc(schedule.model_copy(update={"lease_owner": None, "lease_until": None}))
        try:
            await self._retry(
                "put_schedule", lambda: self._schedules.insert_one(dict(doc)), self._same_doc(self._schedules, doc)
            )
        except DuplicateKeyError as exc:
            raise ConflictError(schedule.id, 0) from exc

    async def get_schedule(self, schedule_id: str) -> ScheduleRow | None:
        found = await self._retry("get_schedule", lambda: self._schedules.find_one({"_id": schedule_id}))
        return None if found is None else _schedule(found)

    async def list_schedules(self) -> list[ScheduleRow]:
        docs = await self._retry("list_schedules", lambda: self._schedules.find({}).to_list(None))
        return sorted((_schedule(doc) for doc in docs), key=lambda row: (row.next_at is None, row.next_at, row.id))

    async def delete_schedule(self, schedule_id: str) -> bool:
        result = await self._retry("delete_schedule", lambda: self._schedules.delete_one({"_id": schedule_id}))
        return bool(result.deleted_count == 1)

    async def due_schedules(self, now: datetime, limit: int) -> list[ScheduleRow]:
        stamp = _stamp(now)
        docs = await self._retry(
            "due_schedules",
            lambda: (
                self._schedules.find({"next_at": {"$ne": None, "$lte": stamp}, **_lease_free(stamp)})
                .sort([("next_at", ASCENDING), ("_id", ASCENDING)])
                .limit(limit)
                .to_list(None)
            ),
        )
        return [_schedule(doc) for doc in docs]

    async def claim_schedule(self, schedule_id: str, owner: str, until: datetime, now: datetime) -> ScheduleRow | None:
        found = await self._retry(
            "claim_schedule",
            lambda: self._schedules.find_one_and_update(
                {
                    "_id": schedule_id,
                    "$or": [{"lease_until": None}, {"lease_owner": owner}, {"lease_until": {"$lte": _us(now)}}],
                },
                {"$set": {"lease_owner": owner, "lease_until": _us(until)}},
                return_document=ReturnDocument.AFTER,
            ),
        )
        return None if found is None else _schedule(found)

    async def finish_schedule(
        self, schedule_id: str, owner: str, next_at: datetime | None, fired: int, last_fired_at: datetime | None
    ) -> bool:
        changes = {
            "next_at": _us(next_at), "fired": fired, "last_fired_at": _iso(last_fired_at),
            "lease_owner": None, "lease_until": None,
        }  # fmt: skip

        async def check() -> object:
            found = await self._schedules.find_one({"_id": schedule_id})
            if found is None:
                return False
            if all(found.get(name) == value for name, value in changes.items()):
                return True
            return _UNKNOWN if found["lease_owner"] == owner else False

        result = await self._retry(
            "finish_schedule",
            lambda: self._schedules.update_one({"_id": schedule_id, "lease_owner": owner}, {"$set": changes}),
            check,
        )
        return result if isinstance(result, bool) else result.modified_count == 1

    async def close(self) -> None:
        """Close the client if this store opened it (never one it was given)."""
        if self._deferred:
            await self._write_all_deferred()
        if self._owns_client:
            await self._client.close()


# -- documents <-> models --------------------------------------------------------------


def _event(conversation_id: str, doc: Mapping[str, Any]) -> Event:
    body = {name: value for name, value in doc.items() if name not in ("_id", "conversation_id")}
    return event_from_dict(conversation_id, body.get("seq", 0), body)


def _event_doc(conversation_id: str, event: Event) -> Document:
    """The event's document: its conversation, its kind, and the fields that differ from their defaults (as the
    SQLite store stores them; a field left out reads back as its default, and documents with every field read
    the same). Smaller documents cost the driver and the server less to encode, send and store."""
    return {
        "conversation_id": conversation_id,
        "kind": event.kind,
        **event.model_dump(mode="json", exclude_defaults=True),
    }


def _row_doc(row: ConversationRow, last_seq: int) -> Document:
    return {
        "_id": row.id, "dialog": row.dialog, "state": row.state, "wake_at": _us(row.wake_at), "last_seq": last_seq,
        "run": row.run, "run_seq": row.run_seq, "result": row.result, "error": row.error, "parked": row.parked,
        "needs_advance": row.needs_advance, "lease_owner": row.lease_owner, "lease_until": _us(row.lease_until),
        "updated_at": _us(row.updated_at), "tz": row.tz,
    }  # fmt: skip


def _row(doc: Mapping[str, Any]) -> ConversationRow:
    fields = dict(doc)
    fields["id"] = fields.pop("_id")
    for name in ("wake_at", "lease_until", "updated_at"):
        fields[name] = _dt(fields.get(name))
    return ConversationRow.model_validate(fields)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _schedule_doc(schedule: ScheduleRow) -> Document:
    doc = schedule.model_dump(mode="json")
    doc["_id"] = doc.pop("id")
    doc["next_at"] = _us(schedule.next_at)
    doc["lease_until"] = _us(schedule.lease_until)
    return doc


def _schedule(doc: Mapping[str, Any]) -> ScheduleRow:
    fields = dict(doc)
    fields["id"] = fields.pop("_id")
    fields["next_at"] = _dt(fields.get("next_at"))
    fields["lease_until"] = _dt(fields.get("lease_until"))
    return ScheduleRow.model_validate(fields)


def _seeds(client: Any) -> str:
    """``host:port,...`` of a client, for the store's URL (no credentials: the seeds have none)."""
    try:
        nodes = client.topology_description.server_descriptions()
        return ",".join(f"{host}:{port}" for host, port in nodes) or "?"
    except Exception:  # motor proxies and mocks lack it; the URL is only a label here
        return "?"
