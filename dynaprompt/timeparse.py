"""Natural-language times and durations, resolved against a clock and a zone.

Instants ("tomorrow at 9am", "next monday 8:00") are read by dateparser as a
local wall time in the conversation's zone and then placed with ``zoneinfo``,
so daylight-saving changes are handled by the zone database: a wall time that
does not exist (spring forward) moves to the first valid instant after it, a
repeated one (fall back) takes its first occurrence. "in 2 hours" is elapsed
time from now, not wall-clock arithmetic. Durations ("90 minutes", "1h30m",
"2 days") are parsed here by a small grammar. Everything is pure: ``now`` is
always passed in.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dynaprompt.errors import TimeParseError, UnknownTimeZoneError

__all__ = ["localize", "parse_duration", "parse_instant", "zone"]

_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}  # fmt: skip
_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "ten": 10, "half an": 0.5}
_PART = re.compile(r"(\d+(?:\.\d+)?|half an|an|a|one|two|three|four|five|ten)\s*([a-z]+)")
_IN = re.compile(r"^\s*in\s+(.+?)\s*$", re.IGNORECASE)


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The IANA zone called ``name``; ``UnknownTimeZoneError`` if there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UnknownTimeZoneError(name) from exc


def parse_duration(value: timedelta | float | str) -> timedelta:
    """A duration from a timedelta, seconds, or text such as ``"90 minutes"`` or ``"1h 30m"``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise TimeParseError(repr(value), "a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise TimeParseError(str(value), "a duration (it is negative)")
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise TimeParseError(repr(value), "a duration")
    text = value.strip().lower()
    in_match = _IN.match(text)
    if in_match:
        text = in_match.group(1)
    text = re.sub(r"\b(and|,)\b", " ", text).replace(",", " ")
    total = 0.0
    pos = 0
    found = False
    for match in _PART.finditer(text):
        if text[pos : match.start()].strip():
            raise TimeParseError(value, "a duration")
        amount, unit = match.groups()
        count = float(_WORDS.get(amount, amount))
        if unit not in _UNITS:
            raise TimeParseError(value, "a duration")
        total += count * _UNITS[unit]
        pos = match.end()
        found = True
    if not found or text[pos:].strip():
        raise TimeParseError(value, "a duration")
    return timedelta(seconds=total)


def localize(wall: datetime, tz: ZoneInfo) -> datetime:
    """Place a naive local wall time in ``tz``.

    A time skipped by a spring-forward change becomes the first valid instant
    after the gap; a repeated fall-back time takes its first occurrence.
    """
    first = wall.replace(tzinfo=tz, fold=0)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # Skipped: the change happened between the two possible readings; find
    # the first instant whose local reading is not before the wall time.
    low, high = sorted((first.astimezone(UTC), wall.replace(tzinfo=tz, fold=1).astimezone(UTC)))
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0).astimezone(tz)


def parse_instant(value: datetime | str, now: datetime, tz: str) -> datetime:
    """An aware instant from a datetime or text, resolved against ``now`` in zone ``tz``.

    >>> from datetime import datetime, UTC
    >>> parse_instant("tomorrow at 9am", datetime(2026, 1, 5, 12, tzinfo=UTC), "Europe/Paris")
    datetime.datetime(2026, 1, 6, 9, 0, tzinfo=zoneinfo.ZoneInfo(key='Europe/Paris'))
    """
    zone_info = zone(tz)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return localize(value, zone_info)
        return value
    if not isinstance(value, str) or not value.strip():
        raise TimeParseError(repr(value), "a time")
    in_match = _IN.match(value)
    if in_match:
        try:
            return (now + parse_duration(in_match.group(1))).astimezone(zone_info)
        except TimeParseError:
            pass
    import dateparser  # imported late: it takes a while to load

    local_now = now.astimezone(zone_info).replace(tzinfo=None)
    parsed = dateparser.parse(
        value,
        languages=["en"],
        settings={
            "RELATIVE_BASE": local_now,
            "PREFER_DATES_FROM": "future",
            "PREFER_DAY_OF_MONTH": "first",
        },
    )
    if parsed is None:
        raise TimeParseError(value, "a time")
    if parsed.tzinfo is not None:  # the text named its own offset ("10:00+02:00", "9am EST"): keep it
        return parsed.astimezone(zone_info)
    return localize(parsed, zone_info)
