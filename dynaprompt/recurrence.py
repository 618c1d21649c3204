"""Recurrences for scheduled conversations: cron expressions and a small phrase grammar.

Understood phrases (case-insensitive; ``T`` is a time such as ``9am``,
``9:30pm``, ``18:00``, ``noon`` or ``midnight``):

* ``every N minutes`` / ``every N hours`` (also ``every minute``, ``every hour``,
  ``every 90 minutes``): elapsed time from the schedule's start;
* ``every day at T`` / ``daily at T``;
* ``every weekday at T`` (Monday to Friday), ``every weekend at T``;
* ``every monday at T``, ``every monday and thursday at T``,
  ``every tue, thu at T`` (day names, full or three letters, plural allowed);
* ``every month on the 15th at T``, ``every month on the last day at T``;
* ``every year on february 29 at T`` (month name and day);
* a five-field cron expression such as ``0 9 * * 1-5``.

Everything else raises :class:`~dynaprompt.errors.RecurrenceError` naming the
phrase. Calendar recurrences are computed on the local wall clock of the
schedule's zone, so "every day at 9am" stays at 9am across daylight-saving
changes; a wall time skipped by spring-forward fires at the first valid
instant after it, a repeated one (fall back) fires once, at its first
occurrence. A day that a month lacks (the 31st, February 29) is skipped in
that month or year, as cron does.
"""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict

from dynaprompt.errors import RecurrenceError
from dynaprompt.timeparse import localize, zone

__all__ = ["Recurrence", "parse_recurrence"]

_DAYS = {
    "monday": 1, "mon": 1, "tuesday": 2, "tue": 2, "tues": 2, "wednesday": 3, "wed": 3,
    "thursday": 4, "thu": 4, "thurs": 4, "friday": 5, "fri": 5, "saturday": 6, "sat": 6, "sunday": 0, "sun": 0,
}  # fmt: skip
_MONTHS = {
    name: number
    for number, names in enumerate(
        [("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",), ("june", "jun"),
         ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"), ("october", "oct"),
         ("november", "nov"), ("december", "dec")],
        start=1,
    )
    for name in names
}  # fmt: skip
_TIME = r"(?P<time>noon|midnight|\d{1,2}(?::\d{2})?\s*(?:am|pm)?)"
_INTERVAL = re.compile(r"^every\s+(?:(?P<n>\d+)\s+)?(?P<unit>minute|min|hour|hr)s?$")
_DAILY = re.compile(rf"^(?:every\s+day|daily|every\s+morning)\s+at\s+{_TIME}$")
_WEEKDAY = re.compile(rf"^every\s+(?P<which>weekday|weekend)s?\s+at\s+{_TIME}$")
_DAYNAMES = re.compile(rf"^every\s+(?P<days>[a-z,\s]+?)\s+at\s+{_TIME}$")
_MONTHLY = re.compile(
    rf"^every\s+month\s+on\s+the\s+(?:(?P<day>\d{{1,2}})(?:st|nd|rd|th)?|(?P<last>last)\s+day)\s+at\s+{_TIME}$"
)
_YEARLY = re.compile(rf"^every\s+year\s+on\s+(?P<month>[a-z]+)\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\s+at\s+{_TIME}$")


class Recurrence(BaseModel):
    """A parsed recurrence: either a cron expression on local wall time, or a fixed interval."""

    model_config = ConfigDict(frozen=True)
    text: str
    cron: str | None = None
    interval: timedelta | None = None

    def next_after(self, after: datetime, tz: str, anchor: datetime | None = None) -> datetime:
        """The first occurrence strictly after ``after`` (in UTC), reckoned in zone ``tz``.

        An interval counts from ``anchor`` (default: ``after``) in elapsed time.
        """
        zone_info = zone(tz)
        if self.interval is not None:
            start = anchor or after
            if start > after:
                return start.astimezone(UTC)
            steps = int((after - start) / self.interval) + 1
            return (start + steps * self.interval).astimezone(UTC)
        assert self.cron is not None
        local_after = after.astimezone(zone_info).replace(tzinfo=None)
        walls = _croniter()(self.cron, local_after)
        for _ in range(10_000):
            instant = localize(walls.get_next(datetime), zone_info)
            if instant > after:
                return instant.astimezone(UTC)
        raise RecurrenceError(self.text, "it never fires")  # pragma: no cover - cron always advances

    def shortest_gap(self, tz: str, start: datetime) -> timedelta:
        """The shortest time between occurrences over the next few fires (to enforce a minimum)."""
        if self.interval is not None:
            return self.interval
        times = [self.next_after(start, tz)]
        for _ in range(8):
            times.append(self.next_after(times[-1], tz))
        return min(later - earlier for earlier, later in itertools.pairwise(times))


def _time(text: str) -> tuple[int, int]:
    text = text.strip()
    if text == "noon":
        return 12, 0
    if text == "midnight":
        return 0, 0
    match = re.fullmatch(r"(\d{1,2})(?::(\d{2}))?\s*(am|pm)?", text)
    if match is None:
        raise ValueError(text)
    hour, minute = int(match.group(1)), int(match.group(2) or 0)
    if match.group(3):
        if not 1 <= hour <= 12:
            raise ValueError(text)
        hour = hour % 12 + (12 if match.group(3) == "pm" else 0)
    if hour > 23 or minute > 59:
        raise ValueError(text)
    return hour, minute


def parse_recurrence(text: str) -> Recurrence:
    """Parse ``text`` (a phrase from the list above or a cron expression).

    >>> parse_recurrence("every weekday at 10:30").cron
    '30 10 * * 1-5'
    >>> parse_recurrence("every 2 hours").interval
    datetime.timedelta(seconds=7200)
    """
    if not isinstance(text, str) or not text.strip():
        raise RecurrenceError(repr(text), "it is empty")
    phrase = " ".join(text.lower().split())
    try:
        cron = _phrase_to_cron(phrase)
    except ValueError as exc:
        raise RecurrenceError(text, f"{exc.args[0]!r} is not a time of day" if exc.args else "bad time") from None
    if cron == "interval":
        match = _INTERVAL.match(phrase)
        assert match is not None
        unit = 60 if match.group("unit") in ("minute", "min") else 3600
        count = int(match.group("n") or 1)
        if count < 1:
            raise RecurrenceError(text, "the interval must be at least 1")
        return Recurrence(text=text, interval=timedelta(seconds=unit * count))
    if cron is None:
        fields = phrase.split()
        if len(fields) == 5 and _croniter().is_valid(phrase):
            cron = phrase
        else:
            raise RecurrenceError(text, "it is neither a known phrase nor a five-field cron expression")
    return Recurrence(text=text, cron=cron)


def _phrase_to_cron(phrase: str) -> str | None:
    if _INTERVAL.match(phrase):
        return "interval"
    if match := _DAILY.match(phrase):
        hour, minute = _time(match.group("time"))
        return f"{minute} {hour} * * *"
    if match := _WEEKDAY.match(phrase):
        hour, minute = _time(match.group("time"))
        days = "1-5" if match.group("which") == "weekday" else "0,6"
        return f"{minute} {hour} * * {days}"
    if match := _MONTHLY.match(phrase):
        hour, minute = _time(match.group("time"))
        day = "L" if match.group("last") else match.group("day")
        if day != "L" and not 1 <= int(day) <= 31:
            return None
        return f"{minute} {hour} {day} * *"
    if match := _YEARLY.match(phrase):
        month = _MONTHS.get(match.group("month"))
        day = int(match.group("day"))
        if month is None or not 1 <= day <= 31:
            return None
        hour, minute = _time(match.group("time"))
        return f"{minute} {hour} {day} {month} *"
    if match := _DAYNAMES.match(phrase):
        names = [
            name.rstrip("s") if name.rstrip("s") in _DAYS else name
            for name in re.split(r"[,\s]+|\band\b", match.group("days"))
        ]
        names = [name for name in names if name and name != "and"]
        if not names or any(name not in _DAYS for name in names):
            return None
        hour, minute = _time(match.group("time"))
        return f"{minute} {hour} * * {','.join(str(_DAYS[name]) for name in names)}"
    return None


def _croniter() -> Any:
    """croniter, imported on first use: with dateutil, which it imports, it is some 4,700 objects that every full
    collection of the cyclic garbage collector visits (a sixth of a runner's), in every process, schedules or
    not."""
    from croniter import croniter

    return croniter
