"""``dynaprompt schedule / schedules / unschedule``, run as real subprocesses against a SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from dynaprompt import ListChannel, Runner, open_store
from dynaprompt.clock import SystemClock
from dynaprompt.loading import load_module
from dynaprompt.testing import VirtualClock

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

BOT = """
from dynaprompt import dialog, send


@dialog(name="cli_schedule_hello")
async def hello(name: str = "you", times: int = 1):
    for _ in range(times):
        yield send(f"Hi {name}!")
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "cli_schedule_bot.py").write_text(BOT)
    return tmp_path


def dynaprompt(workdir: Path, *arguments: str, store: bool = True) -> subprocess.CompletedProcess[str]:
    store_args = ["--store", f"sqlite:///{workdir}/schedules.db"] if store else []
    return subprocess.run(
        [sys.executable, "-m", "dynaprompt.cli", *arguments, *store_args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def listed(workdir: Path) -> list[dict[str, object]]:
    done = dynaprompt(workdir, "schedules", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert isinstance(found, list)
    return found


def test_a_recurring_schedule_is_listed_with_its_next_fire_in_its_own_zone(workdir: Path) -> None:
    done = dynaprompt(
        workdir, "schedule", "cli_schedule_bot.py", "ann", "Ann", "--every", "every day at 9am", "--tz", "Europe/Paris"
    )
    assert done.returncode == 0, done.stderr
    schedule_id = done.stdout.strip()
    assert schedule_id.startswith("sch_")

    [item] = listed(workdir)
    assert item["id"] == schedule_id
    assert item["dialog"] == "cli_schedule_hello"
    assert item["conversation_id"] == "ann"
    assert item["args"] == ["Ann"]
    assert item["every"] == "every day at 9am"
    assert item["tz"] == "Europe/Paris"
    next_at = datetime.fromisoformat(str(item["next_at"]))
    paris = next_at.astimezone(ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute) == (9, 0)
    assert next_at.utcoffset() == paris.utcoffset()  # printed in the schedule's zone, not UTC
    assert timedelta(0) < next_at - SystemClock().now() <= timedelta(days=1)

    table = dynaprompt(workdir, "schedules")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "DIALOG", "CONVERSATION", "RECURRENCE", "NEXT"]
    assert row.split()[:3] == [schedule_id, "cli_schedule_hello", "ann"]
    assert "every day at 9am" in row
    assert row.endswith(f"{paris:%Y-%m-%d} 09:00 {paris.tzname()} (Europe/Paris)")


def test_a_one_off_schedule_carries_its_arguments_and_reads_once(workdir: Path) -> None:
    done = dynaprompt(
        workdir, "schedule", "cli_schedule_bot.py:hello", "bob", '"Bob"', "--json-args", "--kwarg", "times=3",
        "--at", "in 2 hours",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [item] = listed(workdir)
    assert item["args"] == ["Bob"]
    assert item["kwargs"] == {"times": 3}
    assert item["every"] is None
    assert item["tz"] == "UTC"
    expected = SystemClock().now() + timedelta(hours=2)
    assert abs(datetime.fromisoformat(str(item["next_at"])) - expected) < timedelta(minutes=1)
    row = dynaprompt(workdir, "schedules").stdout.splitlines()[1]
    assert row.split()[3] == "once"


def test_unschedule_removes_it_and_an_unknown_id_exits_1(workdir: Path) -> None:
    first = dynaprompt(workdir, "schedule", "cli_schedule_bot.py", "ann", "--every", "every monday at 18:00")
    second = dynaprompt(workdir, "schedule", "cli_schedule_bot.py", "bob", "--every", "every 2 hours")
    kept, removed = first.stdout.strip(), second.stdout.strip()
    assert {item["id"] for item in listed(workdir)} == {kept, removed}

    done = dynaprompt(workdir, "unschedule", removed)
    assert done.returncode == 0, done.stderr
    assert [item["id"] for item in listed(workdir)] == [kept]

    again = dynaprompt(workdir, "unschedule", removed)
    assert again.returncode == 1
    assert f"no schedule {removed!r}" in again.stderr
    assert [item["id"] for item in listed(workdir)] == [kept]


def test_no_schedules_prints_an_empty_list(workdir: Path) -> None:
    assert listed(workdir) == []
    done = dynaprompt(workdir, "schedules")
    assert done.returncode == 0
    assert done.stdout == ""
    assert "no schedules" in done.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--at", "yesterday at 9am"], "which is not in the future"),
        (["--every", "every blue moon"], "could not understand the recurrence 'every blue moon'"),
        (["--every", "every day at 9am", "--tz", "Mars/Olympus_Mons"], "unknown time zone 'Mars/Olympus_Mons'"),
        (["--every", "every hour", "--min-interval", "2 hours"], "fires more often than the minimum of 2:00:00"),
        ([], "needs at= (once), every= (recurring), or both"),
        (["--at", "in 1 hour", "--kwarg", "no-equals-sign"], "--kwarg takes NAME=VALUE"),
    ],
    ids=["past-at", "unknown-phrase", "unknown-zone", "too-frequent", "no-time", "bad-kwarg"],
)
def test_bad_input_prints_the_reason_exits_2_and_stores_nothing(
    workdir: Path, options: list[str], message: str
) -> None:
    done = dynaprompt(workdir, "schedule", "cli_schedule_bot.py", "ann", *options)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr
    assert done.stderr.startswith("dynaprompt: ")
    assert "Traceback" not in done.stderr
    assert listed(workdir) == []


def test_an_unknown_dialog_file_exits_2(workdir: Path) -> None:
    done = dynaprompt(workdir, "schedule", "no_such_bot.py", "ann", "--at", "in 1 hour")
    assert done.returncode == 2
    assert "no such file: no_such_bot.py" in done.stderr


def test_the_default_store_is_the_projects_sqlite_file(workdir: Path) -> None:
    done = dynaprompt(workdir, "schedule", "cli_schedule_bot.py", "ann", "--at", "in 1 hour", store=False)
    assert done.returncode == 0, done.stderr
    assert (workdir / ".dynaprompt" / "dynaprompt.db").is_file()
    listing = dynaprompt(workdir, "schedules", "--json", store=False)
    assert [item["id"] for item in json.loads(listing.stdout)] == [done.stdout.strip()]


async def test_a_runner_on_the_store_fires_what_the_command_scheduled(workdir: Path) -> None:
    done = dynaprompt(workdir, "schedule", "cli_schedule_bot.py", "ann", "Ann", "--at", "in 1 hour")
    assert done.returncode == 0, done.stderr
    load_module(str(workdir / "cli_schedule_bot.py"))  # the serving process must know the dialog
    store = await open_store(f"sqlite:///{workdir}/schedules.db")
    channel = ListChannel()
    clock = VirtualClock(SystemClock().now())
    try:
        async with Runner(store, channel, clock=clock) as runner:
            await runner.run_due()
            assert channel.texts() == []  # not before its time
            clock.advance(timedelta(hours=1, minutes=1))
            await runner.run_due()
            assert channel.texts("ann") == ["Hi Ann!"]
            assert await runner.schedules() == []  # a one-off schedule is gone once fired
    finally:
        await store.close()
