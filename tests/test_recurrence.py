"""Recurrence phrases and cron on local wall time: DST, month ends, leap day."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from dynaprompt import DynapromptError
from dynaprompt.errors import RecurrenceError
from dynaprompt.recurrence import parse_recurrence
from dynaprompt.timeparse import zone


def occurrences(phrase: str, start: datetime, tz: str, count: int) -> list[datetime]:
    recurrence = parse_recurrence(phrase)
    times = [recurrence.next_after(start, tz)]
    while len(times) < count:
        times.append(recurrence.next_after(times[-1], tz))
    return times


@pytest.mark.parametrize(
    ("phrase", "cron"),
    [
        ("every day at 9am", "0 9 * * *"),
        ("daily at 18:30", "30 18 * * *"),
        ("every weekday at 10:30", "30 10 * * 1-5"),
        ("every weekend at noon", "0 12 * * 0,6"),
        ("every monday at 18:00", "0 18 * * 1"),
        ("Every Monday and Thursday at 6pm", "0 18 * * 1,4"),
        ("every tue, thu at 7am", "0 7 * * 2,4"),
        ("every month on the 15th at 9am", "0 9 15 * *"),
        ("every month on the last day at 9am", "0 9 L * *"),
        ("every year on february 29 at 9am", "0 9 29 2 *"),
        ("0 9 * * 1-5", "0 9 * * 1-5"),
    ],
)
def test_phrases_become_cron(phrase: str, cron: str) -> None:
    assert parse_recurrence(phrase).cron == cron


@pytest.mark.parametrize(
    ("phrase", "seconds"), [("every 2 hours", 7200), ("every hour", 3600), ("every 90 minutes", 5400)]
)
def test_intervals_are_elapsed_time(phrase: str, seconds: int) -> None:
    recurrence = parse_recurrence(phrase)
    assert recurrence.interval == timedelta(seconds=seconds)
    start = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # across London's spring-forward at 01:00 UTC
    first = recurrence.next_after(start, "Europe/London", anchor=start)
    assert first - start == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "phrase", ["every fortnight", "every day", "sometimes", "every day at 25:00", "every blursday at 9am", ""]
)
def test_unknown_phrases_are_refused(phrase: str) -> None:
    with pytest.raises(RecurrenceError) as raised:
        parse_recurrence(phrase)
    assert isinstance(raised.value, DynapromptError)
    assert "recurrence" in str(raised.value)


def test_nine_am_stays_nine_am_local_across_london_spring_forward() -> None:
    times = occurrences("every day at 9am", datetime(2026, 3, 27, 12, tzinfo=UTC), "Europe/London", 3)
    assert [t.hour for t in times] == [9, 8, 8]
    assert all(t.astimezone(zone("Europe/London")).hour == 9 for t in times)


def test_nine_am_stays_nine_am_local_across_new_york_fall_back() -> None:
    times = occurrences("every day at 9am", datetime(2026, 10, 31, 12, tzinfo=UTC), "America/New_York", 3)
    assert [t.hour for t in times] == [13, 14, 14]
    assert all(t.astimezone(zone("America/New_York")).hour == 9 for t in times)


def test_skipped_wall_time_fires_at_first_instant_after_the_gap() -> None:
    times = occurrences("every day at 2:30am", datetime(2026, 3, 7, 12, tzinfo=UTC), "America/New_York", 3)
    assert times[0] == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT: the gap is 02:00-03:00
    assert times[1] == datetime(2026, 3, 9, 6, 30, tzinfo=UTC)  # 02:30 EDT


def test_repeated_wall_time_fires_once() -> None:
    times = occurrences("every day at 1:30am", datetime(2026, 10, 24, 12, tzinfo=UTC), "Europe/London", 3)
    assert times[0] == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # the first 01:30 (BST)
    assert times[1] == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # next day, not the second 01:30


def test_last_day_of_month_follows_month_lengths() -> None:
    times = occurrences("every month on the last day at 9am", datetime(2028, 1, 1, tzinfo=UTC), "UTC", 3)
    assert [t.date().isoformat() for t in times] == ["2028-01-31", "2028-02-29", "2028-03-31"]


def test_the_31st_skips_shorter_months() -> None:
    times = occurrences("every month on the 31st at 9am", datetime(2026, 1, 1, tzinfo=UTC), "UTC", 3)
    assert [t.month for t in times] == [1, 3, 5]


def test_leap_day_fires_only_in_leap_years() -> None:
    times = occurrences("every year on february 29 at 9am", datetime(2026, 1, 1, tzinfo=UTC), "UTC", 2)
    assert [t.year for t in times] == [2028, 2032]


def test_croniter_is_imported_only_when_a_recurrence_needs_it() -> None:
    # Every object a module leaves behind is visited by each full collection of the garbage collector, in every
    # runner; croniter is needed only once a schedule computes a time.
    script = (
        "import sys\n"
        "from datetime import UTC, datetime\n"
        "import dynaprompt, dynaprompt.runner, dynaprompt.scheduling\n"
        "assert 'croniter' not in sys.modules, 'imported with dynaprompt'\n"
        "from dynaprompt.recurrence import parse_recurrence\n"
        "parse_recurrence('0 9 * * 1-5').next_after(datetime.now(UTC), 'UTC')\n"
        "assert 'croniter' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
