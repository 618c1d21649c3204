"""The ``Store`` protocol: an append-only event log plus a rebuildable index.

The log (``events``) is the truth. The conversation row is an index the
runner keeps beside it: current state, when it next wakes, the last sequence
number, and the lease that says which runner is advancing it. Every store
enforces one writer per sequence number with a unique key on
``(conversation_id, seq)`` and raises :class:`~dynaprompt.errors.ConflictError`
when it is taken. Leases change through single-row compare-and-set updates.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, JsonValue

from dynaprompt.events import Event
from dynaprompt.models import State

__all__ = ["Claim", "ConversationRow", "RowUpdate", "ScheduleRow", "Store"]


class ConversationRow(BaseModel):
    """The index record of one conversation (its latest run)."""

    model_config = ConfigDict(frozen=True)
    id: str
    dialog: str
    state: State = "running"
    wake_at: datetime | None = None
    last_seq: int = 0
    run: int = 1
    run_seq: int = 1
    result: JsonValue = None
    error: str | None = None
    parked: bool = False
    needs_advance: bool = False
    lease_owner: str | None = None
    lease_until: datetime | None = None
    updated_at: datetime
    tz: str = "UTC"


class Claim(BaseModel):
    """Take the lease in the same write as an append, if the conversation is where the runner saw it.

    The runner advanced a cached conversation without holding its lease (the advance is pure), and
    now appends the result only if nothing moved meanwhile: the log still ends at ``last_seq`` in the
    run started at ``run_seq``, the row is neither parked nor flagged ``needs_advance``, and the lease
    is free, ``owner``'s, or expired at ``now``. Then the lease goes to ``owner`` until ``until`` with
    the events; otherwise the store raises ``ConflictError`` and writes nothing. One commit a turn
    fewer than claiming first.
    """

    model_config = ConfigDict(frozen=True)
    owner: str
    until: datetime
    now: datetime
    last_seq: int
    run_seq: int

    def allows(self, row: ConversationRow) -> bool:
        """True when ``row`` is as the claim expects (the check every store makes, here for those in Python)."""
        lease_free = row.lease_owner in (None, self.owner) or (
            row.lease_until is not None and row.lease_until <= self.now
        )
        return (
            row.last_seq == self.last_seq
            and row.run_seq == self.run_seq
            and not row.parked
            and not row.needs_advance
            and lease_free
        )


class RowUpdate(BaseModel):
    """Fields of a conversation row to set with an append; ``None`` leaves a field alone
    except where ``clear`` names it.

    ``release_owner``: if the lease is held by this owner, drop it in the same
    write (the runner's last append of an advance releases with it: one commit,
    not two). A store that ignores it stays correct: the runner sees the lease
    still held in the returned row and releases it with ``release()``.

    ``claim``: append only if the row is as the runner saw it, taking the lease with the events (see
    :class:`Claim`); with ``release_owner`` too, the lease is checked but left free. Every store must
    honour it: it is what keeps an append made without holding the lease safe.

    ``provisional``: the runner holds the lease and this runner's next write to the conversation follows at
    once (the hand-off's "delivered" append, or a release if the channel refused), so a store whose append
    is two writes may put this one's row write off and make it with that next write: the log is the truth,
    and a crash in between leaves events past the row's ``last_seq``, which the store repairs on read as
    for any crash between an append's two writes. A store that ignores it stays correct.
    """

    model_config = ConfigDict(frozen=True)
    dialog: str | None = None
    state: State | None = None
    wake_at: datetime | None = None
    run: int | None = None
    run_seq: int | None = None
    result: JsonValue = None
    error: str | None = None
    parked: bool | None = None
    needs_advance: bool | None = None
    tz: str | None = None
    clear: frozenset[str] = frozenset()
    release_owner: str | None = None
    claim: Claim | None = None
    provisional: bool = False

    def apply(self, row: ConversationRow, last_seq: int, now: datetime) -> ConversationRow:
        changes: dict[str, object] = {"last_seq": last_seq, "updated_at": now}
        if self.claim is not None:
            changes["lease_owner"], changes["lease_until"] = self.claim.owner, self.claim.until
            if self.release_owner == self.claim.owner:
                changes["lease_owner"] = changes["lease_until"] = None
        elif self.release_owner is not None and row.lease_owner == self.release_owner:
            changes["lease_owner"] = changes["lease_until"] = None
        for name in (
            "dialog",
            "state",
            "wake_at",
            "run",
            "run_seq",
            "result",
            "error",
            "parked",
            "needs_advance",
            "tz",
        ):
            value = getattr(self, name)
            if value is not None or name in self.clear:
                changes[name] = value
        return row.model_copy(update=changes)


class ScheduleRow(BaseModel):
    """A scheduled conversation: which dialog, which conversation, when next.

    ``every`` is the recurrence as the user wrote it (a cron expression or a
    phrase); ``next_at`` is the next occurrence (None once a one-off fired).
    The lease fields let exactly one runner fire an occurrence.
    """

    model_config = ConfigDict(frozen=True)
    id: str
    dialog: str
    conversation_id: str
    dialog_args: list[JsonValue] = []
    dialog_kwargs: dict[str, JsonValue] = {}
    tz: str = "UTC"
    every: str | None = None
    next_at: datetime | None = None
    missed: str = "run_late"
    grace_seconds: float = 3600.0
    overlap: str = "skip"
    created_at: datetime
    fired: int = 0
    last_fired_at: datetime | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None


@runtime_checkable
class Store(Protocol):
    """What the runner needs of a store. Run :func:`dynaprompt.testing.check_store` on yours."""

    url: str

    async def get(self, conversation_id: str) -> ConversationRow | None:
        """The conversation's index row, or None."""

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Event]:
        """The conversation's events with ``seq > after_seq``, in order, validated."""

    async def load_logs(self, conversation_ids: list[str]) -> dict[str, list[Event]]:
        """The whole log of each of these conversations, as ``load(id)`` gives it, read together where the store
        can (``run_due`` reads the logs of the conversations it wakes together in one go); an id without a log
        maps to ``[]``. A log that cannot be read fails the whole call, as ``load`` would fail for it."""

    async def create(self, row: ConversationRow, events: list[Event]) -> None:
        """Insert a new conversation's row and first events; ``ConflictError`` if the id exists."""

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow | None:
        """Append events (the first must be ``last_seq + 1``) and update the row; return the new row (a store
        may return None instead when ``update.provisional``: the runner does not use that row).

        ``ConflictError`` when another writer already holds one of the sequence
        numbers; nothing is written then.
        """

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        """Take the lease if it is free, expired, ours, or held by ``steal_from``; the row, or None."""

    async def acquire_many(self, conversation_ids: list[str], owner: str, until: datetime, now: datetime) -> list[str]:
        """Take the lease of each of these conversations whose lease is free or expired at ``now`` (not a live
        one, ours included), all in one write where the store can; the ids taken, in the order given.

        ``run_due`` claims what ``due`` found before it reads any log, so runners sharing a store split the due
        work between them instead of each replaying every due conversation and all but one losing the claim.
        An unknown id is not taken. A store may report an id it did not take this time if ``owner`` already
        held it until exactly ``until`` (the runner's own work on it is serialised with the fire it claims for).
        """

    async def release(self, conversation_id: str, owner: str, last_seq: int | None) -> bool:
        """Drop our lease if the log still ends at ``last_seq`` (None: wherever); False if it moved or was not ours."""

    async def due(self, now: datetime, limit: int) -> list[str]:
        """Ids whose ``wake_at <= now`` or that have unconsumed input, lease free or expired, soonest first."""

    async def next_wake_at(self, *, after: datetime | None = None) -> datetime | None:
        """The earliest ``wake_at`` of any conversation or ``next_at`` of any schedule; with ``after``, the
        earliest later than ``after`` (``serve()`` sleeps until it, past work that is due but still pending)."""

    async def conversations(self, state: State | None = None) -> list[ConversationRow]:
        """Every conversation's row, optionally only those in ``state``."""

    async def leased(self) -> list[ConversationRow]:
        """The rows that hold a lease, live or expired (few: a runner holds one only while it advances the
        conversation). A runner's first pass looks there for leases left by processes that died, without
        reading every row."""

    async def put_schedule(self, schedule: ScheduleRow) -> None:
        """Insert a schedule; ``ConflictError`` if its id exists."""

    async def get_schedule(self, schedule_id: str) -> ScheduleRow | None:
        """One schedule, or None."""

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every schedule, soonest ``next_at`` first (those with none last)."""

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Remove a schedule; False if there was none."""

    async def due_schedules(self, now: datetime, limit: int) -> list[ScheduleRow]:
        """Schedules with ``next_at <= now`` whose lease is free or expired, soonest first."""

    async def claim_schedule(self, schedule_id: str, owner: str, until: datetime, now: datetime) -> ScheduleRow | None:
        """Take a schedule's lease (free, ours, or expired) in one atomic update; the row, or None."""

    async def finish_schedule(
        self, schedule_id: str, owner: str, next_at: datetime | None, fired: int, last_fired_at: datetime | None
    ) -> bool:
        """If ``owner`` holds the lease: set ``next_at``/``fired``/``last_fired_at`` and drop the lease; else False."""

    async def close(self) -> None:
        """Release the store's resources."""
