"""``memory://``: the reference store, for tests and property tests."""

from __future__ import annotations

from datetime import datetime

from dynaprompt.errors import ConflictError
from dynaprompt.events import Event
from dynaprompt.models import State
from dynaprompt.stores.base import ConversationRow, RowUpdate, ScheduleRow

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps everything in dicts; each instance is a new, empty store."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._rows: dict[str, ConversationRow] = {}
        self._events: dict[str, list[Event]] = {}
        self._schedules: dict[str, ScheduleRow] = {}

    async def get(self, conversation_id: str) -> ConversationRow | None:
        return self._rows.get(conversation_id)

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Event]:
        events = self._events.get(conversation_id, [])
        return events[after_seq:]

    async def load_logs(self, conversation_ids: list[str]) -> dict[str, list[Event]]:
        return {conversation_id: await self.load(conversation_id) for conversation_id in conversation_ids}

    async def create(self, row: ConversationRow, events: list[Event]) -> None:
        if row.id in self._rows:
            raise ConflictError(row.id, events[0].seq if events else 1)
        self._check_seqs(row.id, 0, events)
        self._rows[row.id] = row.model_copy(update={"last_seq": events[-1].seq if events else 0})
        self._events[row.id] = list(events)

    async def append(
        self, conversation_id: str, events: list[Event], update: RowUpdate, now: datetime
    ) -> ConversationRow:
        row = self._rows[conversation_id]
        log = self._events[conversation_id]
        if update.claim is not None and not update.claim.allows(row):
            raise ConflictError(conversation_id, events[0].seq if events else row.last_seq + 1)
        self._check_seqs(conversation_id, len(log), events)
        log.extend(events)
        new_row = update.apply(row, len(log), now)
        self._rows[conversation_id] = new_row
        return new_row

    def _check_seqs(self, conversation_id: str, last: int, events: list[Event]) -> None:
        for offset, event in enumerate(events):
            if event.seq != last + offset + 1:
                raise ConflictError(conversation_id, event.seq)

    async def acquire(
        self, conversation_id: str, owner: str, until: datetime, now: datetime, *, steal_from: str | None = None
    ) -> ConversationRow | None:
        row = self._rows.get(conversation_id)
        if row is None:
            return None
        free = row.lease_owner is None or row.lease_owner in (owner, steal_from)
        if not free and not (row.lease_until is not None and row.lease_until <= now):
            return None
        row = row.model_copy(update={"lease_owner": owner, "lease_until": until})
        self._rows[conversation_id] = row
        return row

    async def release(self, conversation_id: str, owner: str, last_seq: int | None) -> bool:
        row = self._rows.get(conversation_id)
        if row is None or row.lease_owner != owner or (last_seq is not None and row.last_seq != last_seq):
            return False
        self._rows[conversation_id] = row.model_copy(update={"lease_owner": None, "lease_until": None})
        return True

    async def acquire_many(self, conversation_ids: list[str], owner: str, until: datetime, now: datetime) -> list[str]:
        taken: list[str] = []
        for conversation_id in conversation_ids:
            row = self._rows.get(conversation_id)
            if row is None or (row.lease_owner is not None and (row.lease_until is None or row.lease_until > now)):
                continue
            self._rows[conversation_id] = row.model_copy(update={"lease_owner": owner, "lease_until": until})
            taken.append(conversation_id)
        return taken

    async def due(self, now: datetime, limit: int) -> list[str]:
        def wanted(row: ConversationRow) -> bool:
            leased = row.lease_owner is not None and row.lease_until is not None and row.lease_until > now
            if leased:
                return False
            expired = row.lease_owner is not None
            return expired or row.needs_advance or (row.wake_at is not None and row.wake_at <= now)

        rows = sorted((row for row in self._rows.values() if wanted(row)), key=lambda row: row.wake_at or now)
        return [row.id for row in rows[:limit]]

    async def next_wake_at(self, *, after: datetime | None = None) -> datetime | None:
        times = [row.wake_at for row in self._rows.values() if row.wake_at is not None]
        times += [row.next_at for row in self._schedules.values() if row.next_at is not None]
        if after is not None:
            times = [time for time in times if time > after]
        return min(times) if times else None

    async def conversations(self, state: State | None = None) -> list[ConversationRow]:
        return [row for row in self._rows.values() if state is None or row.state == state]

    async def leased(self) -> list[ConversationRow]:
        return [row for row in self._rows.values() if row.lease_owner is not None]

    async def put_schedule(self, schedule: ScheduleRow) -> None:
        if schedule.id in self._schedules:
            raise ConflictError(schedule.id, 0)
        self._schedules[schedule.id] = schedule

    async def get_schedule(self, schedule_id: str) -> ScheduleRow | None:
        return self._schedules.get(schedule_id)

    async def list_schedules(self) -> list[ScheduleRow]:
        return sorted(self._schedules.values(), key=_schedule_order)

    async def delete_schedule(self, schedule_id: str) -> bool:
        return self._schedules.pop(schedule_id, None) is not None

    async def due_schedules(self, now: datetime, limit: int) -> list[ScheduleRow]:
        due = [
            row
            for row in self._schedules.values()
            if row.next_at is not None
            and row.next_at <= now
            and (row.lease_owner is None or (row.lease_until is not None and row.lease_until <= now))
        ]
        return sorted(due, key=_schedule_order)[:limit]

    async def claim_schedule(self, schedule_id: str, owner: str, until: datetime, now: datetime) -> ScheduleRow | None:
        row = self._schedules.get(schedule_id)
        if row is None:
            return None
        expired = row.lease_until is not None and row.lease_until <= now
        if row.lease_owner not in (None, owner) and not expired:
            return None
        row = row.model_copy(update={"lease_owner": owner, "lease_until": until})
        self._schedules[schedule_id] = row
        return row

    async def finish_schedule(
        self, schedule_id: str, owner: str, next_at: datetime | None, fired: int, last_fired_at: datetime | None
    ) -> bool:
        row = self._schedules.get(schedule_id)
        if row is None or row.lease_owner != owner:
            return False
        self._schedules[schedule_id] = row.model_copy(
            update={
                "next_at": next_at, "fired": fired, "last_fired_at": last_fired_at,
                "lease_owner": None, "lease_until": None,
            }
        )  # fmt: skip
        return True

    async def close(self) -> None:
        return None


def _schedule_order(row: ScheduleRow) -> tuple[bool, datetime | None, str]:
    return (row.next_at is None, row.next_at, row.id)
