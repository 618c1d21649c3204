"""Natural-language times and durations, resolved against a given instant and zone (pure, no clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from dynaprompt import DynapromptError, TimeParseError, UnknownTimeZoneError
from dynaprompt.timeparse import parse_duration, parse_instant

MONDAY_9AM_UTC = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "zone", "expected"),
    [
        ("tomorrow at 9am", "UTC", utc(2026, 1, 6, 9)),
        ("tomorrow at 9am", "Europe/Paris", utc(2026, 1, 6, 8)),
        ("tomorrow at 9am", "America/New_York", utc(2026, 1, 6, 14)),
        ("in 2 hours", "UTC", utc(2026, 1, 5, 11)),
        ("in 2 hours", "Asia/Kolkata", utc(2026, 1, 5, 11)),  # elapsed time: the zone does not matter
        ("in 90 minutes", "UTC", utc(2026, 1, 5, 10, 30)),
        ("next monday 8:00", "UTC", utc(2026, 1, 12, 8)),
        ("next monday 8:00", "Europe/London", utc(2026, 1, 12, 8)),
        ("next monday 8:00", "America/New_York", utc(2026, 1, 12, 13)),
        ("2026-01-10T10:00:00+02:00", "UTC", utc(2026, 1, 10, 8)),  # a written offset wins over the zone
    ],
)
def test_phrases_resolve_in_the_conversation_zone(text: str, zone: str, expected: datetime) -> None:
    resolved = parse_instant(text, MONDAY_9AM_UTC, zone)
    assert resolved == expected
    assert resolved.utcoffset() is not None


def test_result_is_expressed_in_the_conversation_zone() -> None:
    resolved = parse_instant("tomorrow at 9am", MONDAY_9AM_UTC, "Europe/Paris")
    assert resolved.tzinfo == ZoneInfo("Europe/Paris")
    assert (resolved.hour, resolved.minute) == (9, 0)


@pytest.mark.parametrize(
    ("text", "now", "expected"),
    [
        ("9am", utc(2026, 1, 5, 10), utc(2026, 1, 6, 9)),  # already past today: tomorrow
        ("9am", utc(2026, 1, 5, 8), utc(2026, 1, 5, 9)),  # still ahead today: today
        ("friday", MONDAY_9AM_UTC, utc(2026, 1, 9)),
        ("monday", utc(2026, 1, 7, 9), utc(2026, 1, 12)),  # a Wednesday: the coming Monday
        ("January 1", MONDAY_9AM_UTC, utc(2027, 1, 1)),
    ],
)
def test_incomplete_times_prefer_the_future(text: str, now: datetime, expected: datetime) -> None:
    assert parse_instant(text, now, "UTC") == expected


def test_aware_datetime_is_kept_and_naive_one_is_placed_in_the_zone() -> None:
    aware = utc(2026, 2, 1, 12)
    assert parse_instant(aware, MONDAY_9AM_UTC, "Europe/Paris") == aware
    naive = datetime(2026, 2, 1, 12)
    assert parse_instant(naive, MONDAY_9AM_UTC, "Europe/Paris") == utc(2026, 2, 1, 11)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90 minutes", timedelta(minutes=90)),
        ("1h30m", timedelta(minutes=90)),
        ("1h 30m", timedelta(minutes=90)),
        ("1 hour and 30 minutes", timedelta(minutes=90)),
        ("2 days", timedelta(days=2)),
        ("1.5 hours", timedelta(minutes=90)),
        ("an hour", timedelta(hours=1)),
        ("half an hour", timedelta(minutes=30)),
        ("in 10 minutes", timedelta(minutes=10)),
        ("2 weeks", timedelta(days=14)),
        ("45s", timedelta(seconds=45)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_durations_from_numbers_and_timedeltas() -> None:
    assert parse_duration(90) == timedelta(seconds=90)
    assert parse_duration(1.5) == timedelta(seconds=1.5)
    assert parse_duration(timedelta(hours=3)) == timedelta(hours=3)


@pytest.mark.parametrize(
    ("zone", "now", "text", "expected"),
    [
        # Spring forward: 01:00-02:00 does not exist in London on 2026-03-29; the first valid instant after.
        ("Europe/London", utc(2026, 3, 28, 12), "tomorrow at 1:30am", utc(2026, 3, 29, 1)),
        # 02:00-03:00 does not exist in New York on 2026-03-08.
        ("America/New_York", utc(2026, 3, 7, 17), "tomorrow at 2:30am", utc(2026, 3, 8, 7)),
        # Wall times on the day after the change use the new offset.
        ("Europe/London", utc(2026, 3, 28, 12), "tomorrow at 9am", utc(2026, 3, 29, 8)),
        ("America/New_York", utc(2026, 3, 7, 17), "tomorrow at 9am", utc(2026, 3, 8, 13)),
    ],
)
def test_times_in_a_spring_forward_gap_move_to_the_first_valid_instant(
    zone: str, now: datetime, text: str, expected: datetime
) -> None:
    assert parse_instant(text, now, zone) == expected


@pytest.mark.parametrize(
    ("zone", "now", "text", "expected"),
    [
        # Fall back: 01:30 happens twice in London on 2026-10-25 (BST, then GMT); the first one.
        ("Europe/London", utc(2026, 10, 24, 12), "tomorrow at 1:30am", utc(2026, 10, 25, 0, 30)),
        # 01:30 happens twice in New York on 2026-11-01 (EDT, then EST); the first one.
        ("America/New_York", utc(2026, 10, 31, 16), "tomorrow at 1:30am", utc(2026, 11, 1, 5, 30)),
    ],
)
def test_times_repeated_by_fall_back_take_the_first_occurrence(
    zone: str, now: datetime, text: str, expected: datetime
) -> None:
    # Compared in UTC: PEP 495 makes == across zones False for any time inside a fold.
    assert parse_instant(text, now, zone).astimezone(UTC) == expected


def test_in_hours_across_a_clock_change_is_elapsed_time() -> None:
    before_change = utc(2026, 3, 29, 0, 30)  # 00:30 GMT; at 01:00 GMT London jumps to 02:00 BST
    resolved = parse_instant("in 2 hours", before_change, "Europe/London")
    assert resolved == utc(2026, 3, 29, 2, 30)
    assert (resolved.hour, resolved.minute) == (3, 30)  # the wall clock moved three hours


@pytest.mark.parametrize("text", ["the twelfth of never", "blorp o'clock", "", "   "])
def test_garbage_times_raise_time_parse_error(text: str) -> None:
    with pytest.raises(TimeParseError) as raised:
        parse_instant(text, MONDAY_9AM_UTC, "UTC")
    assert isinstance(raised.value, DynapromptError)
    assert "as a time" in str(raised.value)


@pytest.mark.parametrize("value", ["soon", "", "5 parsecs", "10", "-5 minutes", "3 minutes later", -1, True])
def test_garbage_durations_raise_time_parse_error(value: object) -> None:
    with pytest.raises(TimeParseError, match="as a duration"):
        parse_duration(value)  # type: ignore[arg-type]


def test_unknown_zone_raises_unknown_time_zone_error() -> None:
    with pytest.raises(UnknownTimeZoneError, match="Europe/Atlantis"):
        parse_instant("tomorrow at 9am", MONDAY_9AM_UTC, "Europe/Atlantis")
