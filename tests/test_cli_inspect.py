"""``dynaprompt ls``, ``show`` and ``replay-check`` on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from dynaprompt import Runner, dialog, open_store, send, sleep, wait_for_reply
from dynaprompt.cli import main
from dynaprompt.cli.inspect import render_table
from dynaprompt.testing import VirtualClock

from .conftest import START

GREETER_V1 = """
from dynaprompt import dialog, send, wait_for_reply

@dialog(name="test_inspect.greeter")
async def greeter():
    yield send("Hello! Who are you?")
    reply = yield wait_for_reply()
    yield send(f"Hi {reply.text}. What brings you here?")
    yield wait_for_reply()
    yield send("Noted.")
"""
GREETER_V2 = GREETER_V1.replace('f"Hi {reply.text}. What brings you here?"', 'f"Welcome, {reply.text}!"')


@dialog(name="test_inspect.napper")
async def napper():
    yield send("Going to sleep for a day.")
    yield sleep("1 day")
    yield send("Awake.")


@dialog(name="test_inspect.once")
async def once():
    yield send("Anything to say?")
    reply = yield wait_for_reply()
    yield send(f"Thanks for {reply.text!r}.")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/inspect.db"

    async def fill() -> None:
        store = await open_store(url)
        async with Runner(store, clock=VirtualClock(START)) as runner:
            await runner.start(napper, "nap")
            await runner.start(once, "done")
            await runner.deliver("done", "cake")
            await runner.start(once, "open")
        await store.close()

    anyio.run(fill)
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_ls_shows_dialog_state_wake_time_and_last_activity(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    status, out, _ = run(capsys, "ls", "--store", store_url)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "DIALOG", "STATE", "WAKES", "LAST", "ACTIVITY", "ERROR"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"nap", "done", "open"}
    assert "test_inspect.napper  sleeping" in rows["nap"]
    assert "2026-01-06 09:00:00 UTC" in rows["nap"]  # wakes a day after START
    assert "completed" in rows["done"]
    assert "waiting_for_reply" in rows["open"]
    assert "\033[" not in out  # no colours when stdout is not a terminal


def test_ls_filters_by_state_and_prints_json(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    status, out, _ = run(capsys, "ls", "--store", store_url, "--state", "completed", "--json")
    assert status == 0
    [row] = json.loads(out)
    assert (row["conversation_id"], row["dialog"], row["state"]) == ("done", "test_inspect.once", "completed")
    assert row["last_activity_at"].startswith("2026-01-05T09:00:00")
    _, out, _ = run(capsys, "ls", "--store", store_url, "--state", "failed")
    assert out.strip() == "no conversations in state failed"


def test_show_prints_the_transcript_or_the_raw_events(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    status, out, _ = run(capsys, "show", "done", "--store", store_url)
    assert status == 0
    assert out.splitlines()[0].startswith("done  dialog test_inspect.once  run 1  completed")
    assert out.splitlines()[2:] == [
        "2026-01-05 09:00:00 UTC  bot   Anything to say?",
        "2026-01-05 09:00:00 UTC  user  cake",
        "2026-01-05 09:00:00 UTC  bot   Thanks for 'cake'.",
    ]

    _, out, _ = run(capsys, "show", "done", "--events", "--store", store_url)
    kinds = [line.split()[4] for line in out.splitlines()[3:]]
    assert kinds[0] == "started"
    assert {"sent", "waiting", "reply", "delivered", "completed"} <= set(kinds)

    _, out, _ = run(capsys, "show", "done", "--events", "--json", "--store", store_url)
    events = json.loads(out)["events"]
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert "completed" in [event["kind"] for event in events]
    _, out, _ = run(capsys, "show", "done", "--json", "--store", store_url)
    assert [entry["text"] for entry in json.loads(out)["transcript"]] == [
        "Anything to say?",
        "cake",
        "Thanks for 'cake'.",
    ]


def test_show_of_an_unknown_conversation_says_so(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    status, out, err = run(capsys, "show", "ghost", "--store", store_url)
    assert status == 2
    assert out == ""
    assert "unknown conversation 'ghost'" in err


def test_replay_check_detects_a_changed_dialog(
    capsys: pytest.CaptureFixture[str], store_url: str, tmp_path: Path
) -> None:
    deployed, changed = tmp_path / "greeter_v1.py", tmp_path / "greeter_v2.py"
    deployed.write_text(GREETER_V1)
    changed.write_text(GREETER_V2)
    status, out, _ = run(capsys, "replay-check", str(deployed), "--store", store_url)
    assert (status, out.strip()) == (0, "0 live conversation(s) of test_inspect.greeter checked; 0 would diverge")

    from greeter_v1 import greeter  # type: ignore[import-not-found]

    async def talk() -> None:
        store = await open_store(store_url)
        async with Runner(store, clock=VirtualClock(START)) as runner:
            await runner.start(greeter, "past-hello")  # only the first message: the change comes later
            await runner.start(greeter, "past-name")
            await runner.deliver("past-name", "Ann")
        await store.close()

    anyio.run(talk)
    status, out, _ = run(capsys, "replay-check", str(deployed), "--store", store_url)
    assert status == 0
    assert out.splitlines()[-1] == "2 live conversation(s) of test_inspect.greeter checked; 0 would diverge"

    status, out, _ = run(capsys, "replay-check", str(changed), "--store", store_url)
    assert status == 1
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert rows["past-hello"][3] == "ok"
    assert rows["past-name"][3] == "diverges"
    assert out.splitlines()[-1] == "2 live conversation(s) of test_inspect.greeter checked; 1 would diverge"

    status, out, _ = run(capsys, "replay-check", str(changed), "--store", store_url, "--json")
    assert status == 1
    report = json.loads(out)
    assert (report["checked"], report["diverging"]) == (2, 1)
    [diverging] = [c for c in report["conversations"] if c["verdict"] == "diverges"]
    assert diverging["conversation_id"] == "past-name"
    assert diverging["recorded"] == "send('Hi Ann. What brings you here?')"
    assert diverging["yielded"] == "send('Welcome, Ann!')"

    # Nothing was written: the conversation still runs on the deployed code.
    async def still_fine() -> str:
        store = await open_store(store_url)
        async with Runner(store, clock=VirtualClock(START)) as runner:
            state = (await runner.status("past-name")).state
        await store.close()
        return state

    assert anyio.run(still_fine) == "waiting_for_reply"


def test_tables_are_coloured_only_when_asked() -> None:
    plain = render_table(["ID", "STATE"], [["c1", "failed"]])
    coloured = render_table(["ID", "STATE"], [["c1", "failed"]], colour=True)
    assert "\033[" not in plain
    assert "\033[31mfailed\033[0m" in coloured
