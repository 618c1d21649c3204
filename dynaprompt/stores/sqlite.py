"""``sqlite:///path/to.db``: the embedded default store (standard library ``sqlite3``).

WAL mode, one connection, statements run inline on the event loop: each is a
few microseconds to a few hundred, less than handing it to a thread would
cost. The unique primary key ``(conversation_id, seq)`` makes one writer win;
an append and its row update commit in one transaction.

Group commit: writes from tasks running at the same time share one
transaction. A write is queued and its caller waits; the first writer of a
batch yields once to the event loop (so every task ready to write joins),
then runs ``BEGIN IMMEDIATE``, each queued write in its own ``SAVEPOINT`` (a
duplicate key or a lease that matches nothing fails or misses that write
alone), one ``COMMIT``, and wakes every caller. No write returns before the
``COMMIT`` that holds it has returned, so what a caller was told is durable
is durable. A write alone in its batch runs exactly as it would without
batching (no savepoint; a lease update autocommits on its own), and on
asyncio it skips the trip through the loop too when no other task is ready to
run (nobody could join it), so a lone writer pays nothing for the batching.

Checkpoints (copying the WAL into the database file and syncing it) run in a
thread of their own, on a second connection, at most every quarter second
while writes go on, so the event loop never waits for one; SQLite's automatic
checkpoint stays as a backstop at 50,000 WAL pages. The page cache is 16 MiB.

Durability: with ``synchronous=NORMAL`` (the default) a committed write
survives the process being killed, and may be lost with the last commits on
power loss; ``?synchronous=full`` in the URL makes every commit survive power
loss too, at the disk's fsync rate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.lowlevel

from dynaprompt.errors import ConflictError, StoreUnavailableError
from dynaprompt.events import Event, build, event_to_json, events_from_json, log_from_json
from dynaprompt.models import State
from dynaprompt.stores.base import ConversationRow, RowUpdate, ScheduleRow

__all__ = ["SQLiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    dialog TEXT NOT NULL,
    state TEXT NOT NULL,
    wake_at REAL,
    last_seq INTEGER NOT NULL,
    run INTEGER NOT NULL,
    run_seq INTEGER NOT NULL,
    result TEXT,
    error TEXT,
    parked INTEGER NOT NULL DEFAULT 0,
    needs_advance INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    updated_at REAL NOT NULL,
    tz TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    id TEXT PRIMARY KEY,
    next_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS schedules_next ON schedules (next_at) WHERE next_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS conversations_wake ON conversations (wake_at) WHERE wake_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS conversations_attention ON conversations (needs_advance, lease_owner)
    WHERE needs_advance = 1 OR lease_owner IS NOT NULL;
"""

Statement = tuple[str, tuple[object, ...]]
_Insert = tuple[str, int, str]  # an event row: conversation_id, seq, body

_COLUMNS = (
    "id, dialog, state, wake_at, last_seq, run, run_seq, result, error, parked, "
    "needs_advance, lease_owner, lease_until, updated_at, tz"
)


_IDS_PER_STATEMENT = 500  # ids bound in one IN (...): well under SQLite's limit on variables
_LOAD_JOINED = "SELECT count(*), max(seq), group_concat(body, ',') FROM events WHERE conversation_id = ? AND seq > ?"
_UPDATABLE = ("dialog", "state", "wake_at", "run", "run_seq", "result", "error", "parked", "needs_advance", "tz")
_update_sql: dict[tuple[str, ...], str] = {}


def _update_statement(update: RowUpdate, after_seq: int | None) -> tuple[str, list[object], list[object]]:
    """The ``UPDATE ... RETURNING`` that applies ``update`` (as ``RowUpdate.apply`` does), its parameters
    after ``last_seq`` and ``updated_at``, and those after the id (its conditions); the SQL text is cached
    per set of fields, so sqlite3 reuses it.

    With ``after_seq`` (an append of events after that seq) or a claim, the row is changed only if its log
    still ends there (compare-and-set): a write that misses changes nothing, and one that hits cannot then
    meet a taken seq, since every write of events moves ``last_seq`` in the same transaction. So an append
    needs no savepoint of its own in a group commit."""
    names: list[str] = []
    params: list[object] = []
    for name in _UPDATABLE:
        value = getattr(update, name)
        if value is None and name not in update.clear:
            continue
        names.append(name)
        if name == "wake_at":
            value = _ts(value)
        elif name == "result":
            value = None if value is None else json.dumps(value)  # NULL reads back as None, as "null" does
        elif name in ("parked", "needs_advance"):
            value = int(value)
        params.append(value)
    claim = update.claim
    conditions: list[object] = []
    if claim is not None:
        released = update.release_owner == claim.owner
        names.append("claim and release" if released else "claim")
        if not released:
            params += [claim.owner, _ts(claim.until)]
        conditions = [claim.last_seq, claim.run_seq, claim.owner, _ts(claim.now)]
    else:
        if update.release_owner is not None:
            names.append("release")
            params += [update.release_owner, update.release_owner]
        if after_seq is not None:
            names.append("after")
            conditions = [after_seq]
    if update.provisional:
        names.append("no returning")
    key = tuple(names)
    sql = _update_sql.get(key)
    if sql is None:
        sets = "".join(_SETS.get(name, f", {name} = ?") for name in names)
        if claim is not None:
            where = (
                " AND last_seq = ? AND run_seq = ? AND parked = 0 AND needs_advance = 0"
                " AND (lease_owner IS NULL OR lease_owner = ? OR lease_until <= ?)"
            )
        else:
            where = " AND last_seq = ?" if after_seq is not None else ""
        # A provisional update's row is not read back (the runner drops it): RETURNING is most of an UPDATE's cost.
        returning = "" if update.provisional else f" RETURNING {_COLUMNS}"
        sql = _update_sql[key] = (
            f"UPDATE conversations SET last_seq = MAX(last_seq, ?), updated_at = ?{sets} WHERE id = ?{where}{returning}"
        )
    return sql, params, conditions


_SETS = {
    "release": ", lease_owner = CASE WHEN lease_owner = ? THEN NULL ELSE lease_owner END, "
    "lease_until = CASE WHEN lease_owner = ? THEN NULL ELSE lease_until END",
    "claim": ", lease_owner = ?, lease_until = ?",
    "claim and release": ", lease_owner = NULL, lease_until = NULL",
    "after": "",
    "no returning": "",
}


class _Write:
    """One queued write: ``run`` executes its statements on the connection inside the batch's transaction."""

    __slots__ = ("busy", "checked", "conflict", "error", "fn", "log", "result", "single")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        *,
        log: bool = False,
        single: bool = False,
        checked: bool = False,
        conflict: Callable[[], Exception] | None = None,
    ) -> None:
        self.fn = fn
        self.log = log  # writes to the event log commit through SQLiteStore._commit (the crash tests' hook)
        self.single = single  # one statement: alone in its batch it autocommits, as it always did
        # Its first statement is a compare-and-set that raises ConflictError on a miss, having changed nothing;
        # on a hit the rest cannot fail but through a broken database. So no savepoint in a batch (each costs
        # two statements); should it fail after all, the batch is rolled back and each write run alone.
        self.checked = checked
        self.conflict = conflict  # what a unique-key IntegrityError means to the caller
        self.result: Any = None
        self.error: BaseException | None = None
        self.busy = False  # another connection held the write lock: nothing of it ran, try again

    def run(self, db: sqlite3.Connection) -> Any:
        """Execute the write's statements; its result."""
        assert self.fn is not None
        return self.fn(db)

    def conflicted(self) -> Exception | None:
        """What a unique-key ``IntegrityError`` means to the caller; None: a bug, to propagate."""
        return None if self.conflict is None else self.conflict()


class _Append(_Write):
    """The write of ``SQLiteStore.append``: the row's ``UPDATE ... RETURNING``, then the events' inserts.

    A class with its values in slots rather than a closure over them: a turn makes two, and a closure's
    cells and functions are objects the cyclic garbage collector walks while the write waits for its
    COMMIT with a thousand others (measured in the concurrent benchmark)."""

    __slots__ = ("conversation_id", "inserts", "params", "returning", "seq", "sql")

    def __init__(
        self, conversation_id: str, sql: str, params: tuple[object, ...], inserts: list[_Insert], seq: int, *,
        checked: bool, returning: bool,
    ) -> None:  # fmt: skip
        super().__init__(None, log=True, checked=checked)
        self.conversation_id, self.sql, self.params, self.inserts, self.seq = conversation_id, sql, params, inserts, seq
        self.returning = returning  # the UPDATE returns the row (else: True, once it changed it)

    def conflicted(self) -> Exception:
        return ConflictError(self.conversation_id, self.seq)

    def run(self, db: sqlite3.Connection) -> Any:
        cursor = db.execute(self.sql, self.params)
        found = cursor.fetchone() if self.returning else cursor.rowcount == 1 or None
        if found is None and self.checked:  # the log moved on (or the claim's row moved): nothing is written
            raise self.conflicted()
        assert found is not None, f"append to unknown conversation {self.conversation_id!r}"
        if self.inserts:
            db.executemany("INSERT INTO events (conversation_id, seq, body) VALUES (?, ?, ?)", self.inserts)
        return found


class _HalfDone(Exception):
    """A write that should have failed whole or not at all failed half-way: its batch is rolled back."""


@dataclass(eq=False)
class _Batch:
    writes: list[_Write] = field(default_factory=list)
    done: bool = False
    event: anyio.Event | None = None  # created by the first write that has to wait for another's flush


def _nothing_else_ready() -> bool:
    """True when no other callback is ready on the running asyncio loop, so no task could join a batch before
    this one flushes it. Reads CPython's ``_ready`` queue; on another loop or backend, False (always batch)."""
    try:
        ready = getattr(asyncio.get_running_loop(), "_ready", None)
    except RuntimeError:  # trio
        return False
    return ready is not None and not ready


def _joined_log(count: int | None, last_seq: int | None, joined: str | None, after_seq: int) -> list[Event] | None:
    """The events of a log read as one aggregate (count, max(seq), the bodies joined), if they add up: as many
    as the seqs after ``after_seq`` up to ``last_seq``, each valid and in its place; else None (read it again
    row by row, which names a bad event)."""
    if count is None or last_seq != after_seq + count:
        return None
    return log_from_json(f"[{joined}]", after_seq + 1, count)


def _is_busy(exc: sqlite3.Error) -> bool:
    """True when another connection holds the lock (SQLITE_BUSY and its extended codes)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class SQLiteStore:
    """An event log in one SQLite file (created with its folder if missing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        path = parts.path[1:] if parts.netloc == "" and parts.path.startswith("/") else parts.netloc + parts.path
        if url.startswith("sqlite:////"):
            path = "/" + url[len("sqlite:////") :].split("?")[0]
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        synchronous = options.get("synchronous", "normal").upper()
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise StoreUnavailableError(url, f"synchronous must be normal or full, not {synchronous.lower()!r}")
        try:
            self.busy_timeout = float(options.get("busy_timeout", "10"))
        except ValueError:
            raise StoreUnavailableError(url, "busy_timeout must be a number of seconds") from None
        self.path = path
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            # Checkpoints (copying the WAL into the database file, then syncing it) run in a thread of their
            # own, on a connection of their own, every CHECKPOINT_EVERY seconds at most while writes go on
            # (see _committed): SQLite's automatic checkpoint runs inside a commit, on the event loop, and
            # stalls every conversation for up to a hundred milliseconds. The automatic one stays on, at
            # 50,000 pages (about 200 MB of WAL), as a backstop should the thread fall behind.
            self._db.execute("PRAGMA wal_autocheckpoint=50000")
            self._db.execute("PRAGMA cache_size=-16384")  # 16 MiB of page cache (default 2 MiB)
            self._db.executescript(_SCHEMA)
            # From here on a locked database is waited for on the event loop, not inside SQLite (whose busy
            # handler would sleep with the loop blocked): see _submit and _read.
            self._db.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(url, str(exc)) from exc
        self._batch: _Batch | None = None
        self.commits = 0  # transactions committed by this object (benchmarks/bench_core.py reports them)
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_db: sqlite3.Connection | None = None
        self._checkpoint_at = time.monotonic() + self.CHECKPOINT_EVERY

    CHECKPOINT_EVERY = 0.25  # seconds: while writes go on, at most this long between two checkpoints

    def _committed(self) -> None:
        """Count a commit, and start a checkpoint in a thread if the last began ``CHECKPOINT_EVERY`` ago (time,
        not commits: a group commit holds many writes) and none still runs."""
        self.commits += 1
        now = time.monotonic()
        if now < self._checkpoint_at or self.path == ":memory:":
            return
        self._checkpoint_at = now + self.CHECKPOINT_EVERY
        if self._checkpointer is None or not self._checkpointer.is_alive():
            self._checkpointer = threading.Thread(target=self._checkpoint, name="dynaprompt-sqlite-checkpoint")
            self._checkpointer.start()

    def _checkpoint(self) -> None:
        """A PASSIVE checkpoint on the checkpoint connection (it waits for no reader or writer: what it cannot
        copy now, the next one does). SQLite releases the GIL meanwhile, so the event loop runs on."""
        try:
            if self._checkpoint_db is None:
                self._checkpoint_db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the automatic checkpoint is the backstop; the next try may succeed
            logging.getLogger(__name__).warning("WAL checkpoint of %s failed: %s", self.url, exc)

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailableError:
        error = StoreUnavailableError(self.url, str(exc))
        error.__cause__ = exc
        return error

    def _fetchone(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        return self._read(lambda: self._db.execute(sql, params).fetchone())

    def _fetchall(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        rows: list[Any] = self._read(lambda: self._db.execute(sql, params).fetchall())
        return rows

    def _read(self, read: Callable[[], Any]) -> Any:
        """Run a read. In WAL mode a writer never blocks a reader; SQLITE_BUSY comes only in the moments
        another connection recovers or restarts the WAL, so it is retried here, briefly, in place."""
        give_up = time.monotonic() + self.busy_timeout
        while True:
            try:
                return read()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= give_up:
                    raise self._unavailable(exc) from exc
                time.sleep(0.001)

    async def _submit(self, write: _Write) -> Any:
        """Run ``write`` (batched with others) and return its result once committed.

        The write joins the open batch (opening one if none) and returns once that batch ran. While another
        connection (another process) holds the write lock, the write waits on the event loop, sleeping
        0.5 ms and doubling up to 20 ms, for up to ``busy_timeout`` seconds (10 by default, or
        ``?busy_timeout=`` in the URL); then ``StoreUnavailableError``. (One coroutine, not one calling
        another per attempt: a thousand writes waiting for a COMMIT hold one frame each.)"""
        give_up: float | None = None
        delay = 0.0005
        while True:
            write.busy, write.result, write.error = False, None, None
            batch = self._batch
            if batch is not None:  # another task leads this batch: wait for its COMMIT
                batch.writes.append(write)
                if batch.event is None:
                    batch.event = anyio.Event()
                try:
                    await batch.event.wait()
                except BaseException:
                    # Cancelled before the flush, the write never runs; after it (the leader may flush before
                    # this task sees its cancellation), it is committed, like any write whose caller stopped
                    # waiting.
                    if not batch.done:
                        batch.writes.remove(write)
                    raise
            elif _nothing_else_ready():  # nobody could join: no trip through the loop, as if there were no batching
                self._flush_alone(write)
            else:
                batch = self._batch = _Batch([write])
                try:
                    # One trip through the event loop lets every task that is ready to write join this batch.
                    await anyio.lowlevel.checkpoint()
                except BaseException:
                    batch.writes.remove(write)  # cancelled: ours never runs, the others' still do
                    if self._batch is batch:
                        self._batch = None
                    if batch.writes:
                        self._flush(batch)
                    raise
                await self._lead(batch)
            if not write.busy:
                break
            now = time.monotonic()
            give_up = now + self.busy_timeout if give_up is None else give_up
            if now >= give_up:
                raise StoreUnavailableError(self.url, f"the database stayed locked for {self.busy_timeout:g} s")
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.02)
        if write.error is not None:
            raise write.error
        return write.result

    async def _lead(self, batch: _Batch) -> None:
        """Flush the batch this task opened; while another connection holds the write lock, wait and try the
        whole batch again, open meanwhile to writes that come (up to ``busy_timeout``, then each write
        fails with ``StoreUnavailableError``).

        One wait for the batch, not one per write: with two runner processes on one file, a batch meets the
        other's lock often, and hundreds of writes each sleeping, waking and queueing again cost more than
        their statements (measured: a third more writes attempted than made)."""
        delay = 0.0005
        give_up: float | None = None
        while True:
            if self._batch is batch:
                self._batch = None
            if self._flush(batch, wait_if_locked=True):
                return
            now = time.monotonic()
            give_up = now + self.busy_timeout if give_up is None else give_up
            if now >= give_up:
                error = StoreUnavailableError(self.url, f"the database stayed locked for {self.busy_timeout:g} s")
                self._settle(batch, error)
                return
            if self._batch is None:  # writes that come while we wait join this batch
                self._batch = batch
            try:
                await anyio.sleep(delay)
            except BaseException:  # cancelled: each write, ours too, goes back to waiting for the lock alone
                if self._batch is batch:
                    self._batch = None
                for write in batch.writes:
                    write.result, write.error, write.busy = None, None, True
                self._settle(batch, None)
                raise
            delay = min(delay * 2, 0.02)

    def _settle(self, batch: _Batch, error: BaseException | None) -> None:
        """End a batch that will not run: each of its writes fails with ``error`` (if any), and is woken."""
        if error is not None:
            for write in batch.writes:
                write.result, write.error, write.busy = None, error, False
        batch.done = True
        if batch.event is not None:
            batch.event.set()

    def _flush(self, batch: _Batch, *, wait_if_locked: bool = False) -> bool:
        """Run a batch in one transaction and settle every write in it (synchronous: nothing joins meanwhile).

        ``wait_if_locked``: if another connection holds the write lock, leave the batch unsettled and return
        False (nothing of it ran), for the caller to try it again."""
        writes = batch.writes
        try:
            if len(writes) == 1:
                self._flush_alone(writes[0])
            else:
                try:
                    self._transaction(lambda: self._run_batch(writes), log=any(write.log for write in writes))
                except _HalfDone:  # rolled back: each write again, alone, so that only the broken one fails
                    for write in writes:
                        write.result = write.error = None
                        self._flush_alone(write)
                except sqlite3.Error as exc:  # the whole batch failed (locked, disk I/O...): nothing committed
                    if wait_if_locked and _is_busy(exc):
                        for write in writes:
                            write.result = write.error = None
                        return False
                    for write in writes:
                        self._failed(write, exc)
                except BaseException:
                    for write in writes:
                        if write.error is None:
                            write.result = None
                            write.error = StoreUnavailableError(self.url, "the write was interrupted")
                    raise
        except BaseException:
            self._settle(batch, None)
            raise
        self._settle(batch, None)
        return True

    def _run_batch(self, writes: list[_Write]) -> bool:
        """The writes of a batch, inside its transaction: each in a savepoint unless it cannot fail half-way."""
        db = self._db
        for write in writes:
            if write.single:  # one statement is undone on its own if it fails: no savepoint
                self._run_one(write)
            elif write.checked:
                try:
                    write.result = write.run(db)
                except ConflictError as exc:  # missed its compare-and-set: nothing of it ran
                    write.error = exc
                except sqlite3.OperationalError:
                    raise
                except Exception as exc:
                    raise _HalfDone from exc
            else:
                db.execute("SAVEPOINT w")
                if not self._run_one(write):
                    db.execute("ROLLBACK TO w")
                db.execute("RELEASE w")
        return True

    def _flush_alone(self, write: _Write) -> None:
        """Run one write in its own transaction: the statements it always ran, no savepoint."""
        try:
            if write.single:  # one statement autocommits
                if self._run_one(write):
                    self._committed()
                return
            self._transaction(lambda: self._run_one(write), log=write.log)
        except sqlite3.Error as exc:
            self._failed(write, exc)

    def _transaction(self, body: Callable[[], bool], *, log: bool) -> None:
        """``BEGIN IMMEDIATE``, ``body``, then ``COMMIT`` (through ``_commit`` when the log was written) if it
        returned True, else ``ROLLBACK``; rolled back if it raised, and the error propagated."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if not body():
                db.execute("ROLLBACK")
                return
            if log:
                self._commit()
            else:
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._committed()

    def _failed(self, write: _Write, exc: sqlite3.Error) -> None:
        """Settle a write whose transaction failed as a whole: to be tried again if another connection held
        the lock (nothing of it ran), else ``StoreUnavailableError``."""
        busy = _is_busy(exc)
        write.result, write.error, write.busy = None, None if busy else self._unavailable(exc), busy

    def _run_one(self, write: _Write) -> bool:
        """Run one write's statements; False (its error kept) if they failed on their own: a duplicate key, or
        a bug in the write itself. A failure of the database (``OperationalError``...) propagates."""
        try:
            write.result = write.run(self._db)
        except sqlite3.IntegrityError as exc:
            conflict = write.conflicted()
            if conflict is None:
                raise
            write.error = conflict
            conflict.__cause__ = exc
            return False
        except sqlite3.Error:
            raise
        except Exception as exc:
            write.error = exc
            return False
        return True

    def _commit(self) -> None:
        """COMMIT a batch holding event-log writes (tests/crash_worker.py wraps this to kill around it)."""
        self._db.execute("COMMIT")

    async def get(self, conversation_id: str) -> ConversationRow | None:
        found = self._fetchone(f"SELECT {_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,))
        return None if found is None else self._row(found)

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Event]:
        # The bodies joined in one string, validated as one JSON array in one call: 10,000 rows fetched one by
        # one cost a tuple each and a release and retake of the GIL each, more than their validation. They come
        # in the primary key's order, (conversation_id, seq), the order SQLite searches it in; log_from_json
        # takes them only if they are exactly the rows' seqs in that order (so the order is checked, not
        # assumed). Else, or if SQLite cannot build the string (a body that is not UTF-8, a log longer than
        # its longest string), the rows are read in seq order and validated one by one, naming the bad one.
        try:
            count, last_seq, joined = self._db.execute(_LOAD_JOINED, (conversation_id, after_seq)).fetchone()
        except (sqlite3.OperationalError, sqlite3.DataError):
            count = last_seq = joined = None
        if count == 0:
            return []
        events = _joined_log(count, last_seq, joined, after_seq)
        if events is not None:
            return events
        # As bytes: a body that is not UTF-8 is then a corrupt event, named, not a failure of the database.
        rows = self._fetchall(
            "SELECT seq, CAST(body AS BLOB) FROM events WHERE conversation_id = ? AND seq > ? ORDER BY seq",
            (conversation_id, after_seq),
        )
        return events_from_json(conversation_id, rows)

    async def load_logs(self, conversation_ids: list[str]) -> dict[str, list[Event]]:
        # One statement for all (as load() reads one log: the bodies joined by SQLite, validated as one JSON
        # array each); a log that does not come out whole and in order is read again by load(), which falls back
        # row by row and names a bad event.
        logs: dict[str, list[Event]] = {conversation_id: [] for conversation_id in conversation_ids}
        for start in range(0, len(conversation_ids), _IDS_PER_STATEMENT):
            chunk = conversation_ids[start : start + _IDS_PER_STATEMENT]
            try:
                rows = self._fetchall(
                    "SELECT conversation_id, count(*), max(seq), group_concat(body, ',') FROM events"
                    f" WHERE conversation_id IN ({', '.join('?' * len(chunk))}) GROUP BY conversation_id",
                    tuple(chunk),
                )
            except (StoreUnavailableError, sqlite3.DataError):
                rows = [(conversation_id, None, None, None) for conversation_id in chunk]
            for conversation_id, count, last_seq, joined in rows:
                events = _joined_log(count, last_seq, joined, 0)
                logs[conversation_id] = events if events is not None else await self.load(conversation_id)
        return logs

    async def create(self, row: ConversationRow, events: list[Event]) -> None:
        last_seq = events[-1].seq if events else 0
        statements = [
            (f"INSERT INTO conversations ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", self._params(row, last_seq))
        ]
        statements += self._event_inserts(row.id, events)

        def run(db: sqlite3.Connection) -> None:
            for sql, params in statements:
                db.execute(sql, params)

        await self._submit(
            _Write(run, log=True, conflict=lambda: ConflictError(row.id, events[0].seq if events else 1))
        )

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow | None:
        # The row is changed in SQL (only the fields the update names) and returned by the same statement,
        # so the transaction never reads it first: one UPDATE, the inserts, one commit. A provisional update's
        # row is not returned (see Store.append).
        sql, params, conditions = _update_statement(update, events[0].seq - 1 if events else None)
        found = await self._submit(
            _Append(
                conversation_id,
                sql,
                (events[-1].seq if events else 0, _ts(now), *params, conversation_id, *conditions),
                [(conversation_id, e.seq, event_to_json(e)) for e in events],
                events[0].seq if events else update.claim.last_seq + 1 if update.claim is not None else 0,
                checked=bool(events) or update.claim is not None,
                returning=not update.provisional,
            )
        )
        return None if found is True else self._row(found, validate=False)

    def _event_inserts(self, conversation_id: str, events: list[Event]) -> list[Statement]:
        return [
            (
                "INSERT INTO events (conversation_id, seq, body) VALUES (?, ?, ?)",
                (conversation_id, e.seq, event_to_json(e)),
            )
            for e in events
        ]

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        params = (owner, _ts(until), conversation_id, owner, steal_from or owner, _ts(now))
        found = await self._submit(
            _Write(
                lambda db: db.execute(
                    f"UPDATE conversations SET lease_owner = ?, lease_until = ? WHERE id = ? AND (lease_owner IS NULL "
                    f"OR lease_owner = ? OR lease_owner = ? OR lease_until <= ?) RETURNING {_COLUMNS}",
                    params,
                ).fetchone(),
                single=True,
            )
        )
        return None if found is None else self._row(found)

    async def acquire_many(self, conversation_ids: list[str], owner: str, until: datetime, now: datetime) -> list[str]:
        if not conversation_ids:
            return []
        # One UPDATE for the lot, in chunks within the oldest SQLite's limit of 999 parameters.
        chunks = [conversation_ids[start : start + 900] for start in range(0, len(conversation_ids), 900)]

        def run(db: sqlite3.Connection) -> set[str]:
            taken: set[str] = set()
            for chunk in chunks:
                found = db.execute(
                    "UPDATE conversations SET lease_owner = ?, lease_until = ? WHERE id IN "
                    f"({','.join('?' * len(chunk))}) AND (lease_owner IS NULL OR lease_until <= ?) RETURNING id",
                    (owner, _ts(until), *chunk, _ts(now)),
                ).fetchall()
                taken.update(row[0] for row in found)
            return taken

        taken: set[str] = await self._submit(_Write(run, single=len(chunks) == 1))
        return [conversation_id for conversation_id in conversation_ids if conversation_id in taken]

    async def release(self, conversation_id: str, owner: str, last_seq: int | None) -> bool:
        params = (conversation_id, owner, last_seq, last_seq)
        changed: int = await self._submit(
            _Write(
                lambda db: (
                    db.execute(
                        "UPDATE conversations SET lease_owner = NULL, lease_until = NULL "
                        "WHERE id = ? AND lease_owner = ? AND (? IS NULL OR last_seq = ?)",
                        params,
                    ).rowcount
                ),
                single=True,
            )
        )
        return changed == 1

    async def due(self, now: datetime, limit: int) -> list[str]:
        # Two reads, each through its own index, instead of one UNION sorted whole: the conversations that need
        # attention (a flagged reply, a lease, live or expired: few), then the due ones in wake_at order, read
        # along the index and stopped at ``limit``. The UNION sorted every due row on every call, so a runner
        # behind a backlog of 10,000 spent 30 to 100 ms a call, and more the further behind it fell.
        stamp = _ts(now)
        flagged = self._fetchall(
            "SELECT id FROM conversations WHERE (needs_advance = 1 OR lease_owner IS NOT NULL)"
            " AND (lease_owner IS NULL OR lease_until <= ?) LIMIT ?",
            (stamp, limit),
        )
        ids = [row[0] for row in flagged]
        if len(ids) < limit:
            taken = set(ids)
            timed = self._fetchall(
                "SELECT id FROM conversations WHERE wake_at <= ? AND (lease_owner IS NULL OR lease_until <= ?)"
                " ORDER BY wake_at LIMIT ?",
                (stamp, stamp, limit),
            )
            ids += [row[0] for row in timed if row[0] not in taken][: limit - len(ids)]
        return ids

    async def next_wake_at(self, *, after: datetime | None = None) -> datetime | None:
        # NULL compares as nothing, so "> NULL" would match no row: no ``after`` is the start of time.
        stamp = -math.inf if after is None else _ts(after)
        found = self._fetchone(
            "SELECT MIN(at) FROM (SELECT MIN(wake_at) AS at FROM conversations WHERE wake_at > ?"
            " UNION ALL SELECT MIN(next_at) AS at FROM schedules WHERE next_at > ?)",
            (stamp, stamp),
        )
        return _dt(found[0]) if found else None

    # Schedules: the row is stored whole as JSON (validated on read); the columns
    # beside it are what the due query and the lease compare-and-set need.

    async def put_schedule(self, schedule: ScheduleRow) -> None:
        params = (schedule.id, _ts(schedule.next_at), None, None, schedule.model_dump_json())
        await self._submit(
            _Write(
                lambda db: db.execute(
                    "INSERT INTO schedules (id, next_at, lease_owner, lease_until, body) VALUES (?, ?, ?, ?, ?)", params
                ),
                conflict=lambda: ConflictError(schedule.id, 0),
            )
        )

    async def get_schedule(self, schedule_id: str) -> ScheduleRow | None:
        found = self._fetchone("SELECT body, lease_owner, lease_until FROM schedules WHERE id = ?", (schedule_id,))
        return None if found is None else self._schedule(found)

    async def list_schedules(self) -> list[ScheduleRow]:
        rows = self._fetchall(
            "SELECT body, lease_owner, lease_until FROM schedules ORDER BY next_at IS NULL, next_at, id"
        )
        return [self._schedule(found) for found in rows]

    async def delete_schedule(self, schedule_id: str) -> bool:
        deleted: int = await self._submit(
            _Write(lambda db: db.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,)).rowcount, single=True)
        )
        return deleted == 1

    async def due_schedules(self, now: datetime, limit: int) -> list[ScheduleRow]:
        stamp = _ts(now)
        rows = self._fetchall(
            "SELECT body, lease_owner, lease_until FROM schedules WHERE next_at <= ? "
            "AND (lease_owner IS NULL OR lease_until <= ?) ORDER BY next_at, id LIMIT ?",
            (stamp, stamp, limit),
        )
        return [self._schedule(found) for found in rows]

    async def claim_schedule(self, schedule_id: str, owner: str, until: datetime, now: datetime) -> ScheduleRow | None:
        params = (owner, _ts(until), schedule_id, owner, _ts(now))
        found = await self._submit(
            _Write(
                lambda db: db.execute(
                    "UPDATE schedules SET lease_owner = ?, lease_until = ? WHERE id = ? AND (lease_owner IS NULL "
                    "OR lease_owner = ? OR lease_until <= ?) RETURNING body, lease_owner, lease_until",
                    params,
                ).fetchone(),
                single=True,
            )
        )
        return None if found is None else self._schedule(found)

    async def finish_schedule(
        self, schedule_id: str, owner: str, next_at: datetime | None, fired: int, last_fired_at: datetime | None
    ) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            # Read and rewrite in one transaction: the body is rewritten whole, so no other write may slip between.
            found = db.execute(
                "SELECT body, lease_owner, lease_until FROM schedules WHERE id = ? AND lease_owner = ?",
                (schedule_id, owner),
            ).fetchone()
            if found is None:
                return False
            row = self._schedule(found).model_copy(
                update={
                    "next_at": next_at, "fired": fired, "last_fired_at": last_fired_at,
                    "lease_owner": None, "lease_until": None,
                }
            )  # fmt: skip
            cursor = db.execute(
                "UPDATE schedules SET next_at = ?, lease_owner = NULL, lease_until = NULL, body = ? "
                "WHERE id = ? AND lease_owner = ?",
                (_ts(next_at), row.model_dump_json(), schedule_id, owner),
            )
            return cursor.rowcount == 1

        finished: bool = await self._submit(_Write(run))
        return finished

    @staticmethod
    def _schedule(found: Any) -> ScheduleRow:
        body, lease_owner, lease_until = found
        row = ScheduleRow.model_validate_json(body)
        return row.model_copy(update={"lease_owner": lease_owner, "lease_until": _dt(lease_until)})

    async def conversations(self, state: State | None = None) -> list[ConversationRow]:
        if state is None:
            rows = self._fetchall(f"SELECT {_COLUMNS} FROM conversations ORDER BY id")
        else:
            rows = self._fetchall(f"SELECT {_COLUMNS} FROM conversations WHERE state = ? ORDER BY id", (state,))
        return [self._row(found) for found in rows]

    async def leased(self) -> list[ConversationRow]:
        # The first term is the conversations_attention index's own condition (the rows with a lease or a flag),
        # so the read goes along that index, not through every row.
        rows = self._fetchall(
            f"SELECT {_COLUMNS} FROM conversations"
            " WHERE (needs_advance = 1 OR lease_owner IS NOT NULL) AND lease_owner IS NOT NULL"
        )
        return [self._row(found) for found in rows]

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.join()
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
        self._db.close()

    def _params(self, row: ConversationRow, last_seq: int) -> tuple[object, ...]:
        return (
            row.id, row.dialog, row.state, _ts(row.wake_at), last_seq, row.run, row.run_seq,
            json.dumps(row.result), row.error, int(row.parked), int(row.needs_advance),
            row.lease_owner, _ts(row.lease_until), _ts(row.updated_at), row.tz,
        )  # fmt: skip

    @staticmethod
    def _row(found: Any, *, validate: bool = True) -> ConversationRow:
        (cid, dialog_name, state, wake_at, last_seq, run, run_seq, result, error, parked,
         needs_advance, lease_owner, lease_until, updated_at, tz) = found  # fmt: skip
        fields = {
            "id": cid, "dialog": dialog_name, "state": state, "wake_at": _dt(wake_at), "last_seq": last_seq,
            "run": run, "run_seq": run_seq, "result": json.loads(result) if result is not None else None,
            "error": error, "parked": bool(parked), "needs_advance": bool(needs_advance), "lease_owner": lease_owner,
            "lease_until": _dt(lease_until), "updated_at": datetime.fromtimestamp(updated_at, UTC), "tz": tz,
        }  # fmt: skip
        # A row read is validated (model_validate runs in pydantic-core, about twice as fast as model_construct).
        # The row an append returns is the one its own UPDATE wrote (typed columns, values validated on the way
        # in): built without a second validation, which would cost a third of the append's Python time.
        return ConversationRow.model_validate(fields) if validate else build(ConversationRow, **fields)
