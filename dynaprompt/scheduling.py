"""Scheduled conversations: creating schedules and firing each occurrence once.

``Runner.schedule()``, ``schedules()`` and ``unschedule()`` delegate here, and
``Runner.run_due()`` calls :func:`fire_due`. An occurrence is fired under the
schedule's lease (a compare-and-set in the store), and the run it starts
records the schedule id and the occurrence in its ``started`` event, so a
runner that dies between starting the run and moving the schedule on does not
fire it twice: the next runner sees the started event and only moves it on.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from dynaprompt.dialogs import Dialog, lookup
from dynaprompt.errors import ScheduleError
from dynaprompt.events import Started
from dynaprompt.models import Schedule
from dynaprompt.recurrence import parse_recurrence
from dynaprompt.replay import to_json
from dynaprompt.stores.base import ScheduleRow
from dynaprompt.timeparse import parse_instant, zone

if TYPE_CHECKING:
    from dynaprompt.runner import Runner

__all__ = ["MISSED_POLICIES", "OVERLAP_POLICIES", "create", "fire_due", "listing"]

log = logging.getLogger("dynaprompt")

OVERLAP_POLICIES = ("skip", "queue", "replace")
MISSED_POLICIES = ("run_late", "skip")
_ENDED = ("completed", "failed")
_ON_TIME = timedelta(seconds=60)  # how late a fire may be under schedule_missed="skip"


def check_policies(overlap: str, missed: str) -> None:
    """``ScheduleError`` unless both are known policy names."""
    if overlap not in OVERLAP_POLICIES:
        raise ScheduleError(f"schedule_overlap must be one of {', '.join(OVERLAP_POLICIES)}, not {overlap!r}")
    if missed not in MISSED_POLICIES:
        raise ScheduleError(f"schedule_missed must be one of {', '.join(MISSED_POLICIES)}, not {missed!r}")


async def create(
    runner: Runner,
    dialog_fn: Dialog | str,
    conversation_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    at: datetime | str | None,
    every: str | None,
    tz: str | None,
) -> str:
    """Validate and store a schedule; see :meth:`Runner.schedule`."""

    chosen = dialog_fn if isinstance(dialog_fn, Dialog) else lookup(dialog_fn)
    zone_name = tz or runner.tz
    zone(zone_name)
    now = runner.clock.now()
    json_args = to_json(list(args), f"the arguments of {chosen.name}")
    json_kwargs = to_json(kwargs, f"the keyword arguments of {chosen.name}")
    if at is None and every is None:
        raise ScheduleError("schedule() needs at= (once), every= (recurring), or both")
    recurrence = parse_recurrence(every) if every is not None else None
    if recurrence is not None and recurrence.shortest_gap(zone_name, now) < runner.min_schedule_interval:
        raise ScheduleError(
            f"{every!r} fires more often than the minimum of {runner.min_schedule_interval} "
            "(Runner(min_schedule_interval=...))"
        )
    if at is not None:
        first = parse_instant(at, now, zone_name)
        if first <= now:
            raise ScheduleError(f"at={at!r} resolves to {first.isoformat()}, which is not in the future")
    else:
        assert recurrence is not None
        first = recurrence.next_after(now, zone_name)
    row = ScheduleRow(
        id=f"sch_{uuid.uuid4().hex[:12]}", dialog=chosen.name, conversation_id=conversation_id,
        dialog_args=json_args, dialog_kwargs=json_kwargs, tz=zone_name, every=every, next_at=first,
        missed=runner.schedule_missed, grace_seconds=runner.schedule_grace.total_seconds(),
        overlap=runner.schedule_overlap, created_at=now,
    )  # fmt: skip
    await runner.store.put_schedule(row)
    runner._wake_serve()
    return row.id


async def listing(runner: Runner) -> list[Schedule]:
    """Every schedule with its next fire time, soonest first."""
    return [
        Schedule(
            id=row.id,
            dialog=row.dialog,
            conversation_id=row.conversation_id,
            dialog_args=row.dialog_args,
            dialog_kwargs=row.dialog_kwargs,
            tz=row.tz,
            every=row.every,
            next_at=row.next_at,
            fired=row.fired,
            last_fired_at=row.last_fired_at,
        )
        for row in await runner.store.list_schedules()
    ]


async def fire_due(runner: Runner, now: datetime) -> None:
    """Fire each due occurrence once, under the schedule's lease, by the schedule's policies."""
    seen: set[str] = set()
    while True:
        batch = [row for row in await runner.store.due_schedules(now, runner.due_batch) if row.id not in seen]
        if not batch:
            return
        for row in batch:
            seen.add(row.id)
            claimed = await runner.store.claim_schedule(row.id, runner.owner, now + runner.lease, now)
            if claimed is None:
                continue
            try:
                await _fire_one(runner, claimed, now)
            except Exception:
                log.exception("schedule %s could not fire", row.id)
                await runner.store.finish_schedule(
                    row.id, runner.owner, _next_occurrence(claimed, now), claimed.fired, claimed.last_fired_at
                )


async def _fire_one(runner: Runner, row: ScheduleRow, now: datetime) -> None:
    occurrence = row.next_at
    if occurrence is None or occurrence > now:
        await runner.store.finish_schedule(row.id, runner.owner, occurrence, row.fired, row.last_fired_at)
        return
    grace = timedelta(seconds=row.grace_seconds) if row.missed == "run_late" else _ON_TIME
    if row.every is not None and now - occurrence > grace:
        # Several occurrences were missed and the oldest is past the grace period: the latest one that is not
        # (if any) is the occurrence to fire; the rest coalesce into it. Only the grace window is walked.
        recurrence = parse_recurrence(row.every)
        candidate = recurrence.next_after(now - grace - timedelta(microseconds=1), row.tz, anchor=occurrence)
        if candidate <= now:
            while (following := recurrence.next_after(candidate, row.tz, anchor=occurrence)) <= now:
                candidate = following
            occurrence = candidate
    fire = now - occurrence <= grace
    keep_pending = False
    current = await runner.store.get(row.conversation_id)
    if current is not None:
        latest = await runner.store.load(row.conversation_id, current.run_seq - 1)
        started = latest[0] if latest else None
        if isinstance(started, Started) and started.schedule_id == row.id and started.occurrence == occurrence:
            fire = False  # a runner that died after starting this occurrence already fired it
        elif fire and current.state not in _ENDED and not current.parked:
            if row.overlap == "queue":
                fire, keep_pending = False, True
            elif row.overlap == "replace":
                await runner._end_run(row.conversation_id, f"replaced by schedule {row.id}")
            else:
                fire = False
    if fire:
        await runner._start(
            row.dialog, row.conversation_id, list(row.dialog_args), dict(row.dialog_kwargs), row.tz,
            schedule=(row.id, occurrence),
        )  # fmt: skip
    next_at = occurrence if keep_pending else _next_occurrence(row, now)
    fired = row.fired + (1 if fire else 0)
    last_fired_at = now if fire else row.last_fired_at
    await runner.store.finish_schedule(row.id, runner.owner, next_at, fired, last_fired_at)
    if next_at is None:
        await runner.store.delete_schedule(row.id)


def _next_occurrence(row: ScheduleRow, now: datetime) -> datetime | None:
    if row.every is None:
        return None
    anchor = row.next_at or now
    return parse_recurrence(row.every).next_after(max(anchor, now), row.tz, anchor=anchor)
