"""Crash and resume with real processes: SIGKILL at every kind of write, then a new process finishes the job.

``crash_worker.py`` runs a scripted conversation on a SQLite file. First it
runs uninterrupted (the reference, counting the store's writes); then, for
kill points spread over every write, before and after its commit, a worker
kills itself there and a new worker resumes the conversation from the store.
What a user would see must not change: every acknowledged reply is kept once,
no recorded ``call()`` runs again, no bot message is recorded twice, each
message reaches the channel under one stable id, no later than it did
uninterrupted, and the transcript equals the reference. A few cases kill the
resumer too, at its first writes (taking over the dead lease, finishing the
interrupted advance), and a third process finishes.

A ``call()`` interrupted after it ran but before its result was committed runs
again on resume (at-least-once: the log cannot know it ran); once its result
is recorded it never runs again.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from dynaprompt import Runner, Status, open_store

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("crash_worker.py")
CONVERSATION = "survey-1"  # crash_worker.CONVERSATION
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # crash_worker.START: step k runs at START + SCRIPT[k].minutes
TIMEOUT = 60  # seconds for any one worker process: a hang fails the test instead of blocking CI
MAX_CASES = 40  # kill points sampled evenly from every (write, before/after); DYNAPROMPT_CRASH_ALL=1 runs them all
DOUBLE_CASES = 6  # a first kill, then the resumer killed too
KILLED = -signal.SIGKILL


# -- driving workers ------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER.parent), env.get("PYTHONPATH")]))
    env.pop("CRASH_BLOCK_CALL", None)
    return env


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=env or worker_env(), check=False,
    )  # fmt: skip


def acked_steps(stdout: str) -> list[int]:
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("ACK ")]


def acked_replies(stdout: str) -> list[str]:
    """Texts of the replies whose ``deliver()`` returned: ``ACK <k> deliver <text>``."""
    return [
        line.split(maxsplit=3)[3] for line in stdout.splitlines() if line.startswith("ACK ") and " deliver " in line
    ]


def events(workdir: Path, db: str = "crash.db", conversation: str = CONVERSATION) -> list[dict[str, Any]]:
    """The conversation's log as stored, read with plain sqlite3 (not through the code under test)."""
    path = workdir / db
    if not path.exists():
        return []
    with sqlite3.connect(path) as connection:
        try:
            rows = connection.execute(
                "SELECT body FROM events WHERE conversation_id = ? ORDER BY seq", (conversation,)
            ).fetchall()
        except sqlite3.OperationalError:  # killed before the schema was committed
            return []
    connection.close()
    return [json.loads(body) for (body,) in rows]


def lease(workdir: Path) -> tuple[str | None, float | None]:
    with sqlite3.connect(workdir / "crash.db") as connection:
        found = connection.execute(
            "SELECT lease_owner, lease_until FROM conversations WHERE id = ?", (CONVERSATION,)
        ).fetchone()
    connection.close()
    return (None, None) if found is None else (found[0], found[1])


def view(workdir: Path, db: str, conversation: str) -> tuple[Status, list[tuple[str, str]]]:
    """Status and transcript (direction, text) as the public API shows them."""

    async def read() -> tuple[Status, list[tuple[str, str]]]:
        store = await open_store(f"sqlite:///{workdir / db}")
        try:
            async with Runner(store) as runner:
                status = await runner.status(conversation)
                transcript: list[tuple[str, str]] = [
                    (entry.direction, entry.text) for entry in await runner.transcript(conversation)
                ]
        finally:
            await store.close()
        return status, transcript

    return anyio.run(read)


def channel_lines(workdir: Path, name: str = "channel.jsonl") -> list[dict[str, Any]]:
    path = workdir / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def side_effects(workdir: Path) -> list[tuple[str, int]]:
    path = workdir / "side_effects.txt"
    if not path.exists():
        return []
    return [(label, int(pid)) for label, pid in (line.split("\t") for line in path.read_text().splitlines())]


def first_delivery_step(lines: list[dict[str, Any]]) -> dict[str, int]:
    """Message text -> the script step during which it first reached the channel.

    Keyed by text, not id: ids are sequence numbers, and a hand-off record landing later in the log
    after a crash shifts the numbers of the messages after it (each id stays stable on its own).
    """
    steps: dict[str, int] = {}
    for line in lines:
        steps.setdefault(line["text"], line["step"])
    return steps


def call_label(name: str) -> str:
    return name.rpartition(":")[2]  # "__main__:issue_ticket" -> "issue_ticket"


# -- the uninterrupted reference --------------------------------------------------------


@dataclass
class Reference:
    writes: list[str]
    transcript: list[tuple[str, str]]
    events: list[dict[str, Any]]
    channel: list[dict[str, Any]]
    calls: Counter[str]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    workdir = tmp_path_factory.mktemp("reference")
    done = run_worker("survey", "--dir", str(workdir), "--count-writes")
    assert done.returncode == 0, done.stderr
    writes = [line.split(maxsplit=2)[2] for line in done.stdout.splitlines() if line.startswith("WRITE ")]
    status, transcript = view(workdir, "crash.db", CONVERSATION)
    assert status.state == "completed"
    return Reference(
        writes=writes,
        transcript=transcript,
        events=events(workdir),
        channel=channel_lines(workdir),
        calls=Counter(label for label, _ in side_effects(workdir)),
    )


def test_reference_run_exercises_every_kind_of_write(reference: Reference) -> None:
    kinds = {kind for label in reference.writes for kind in label.replace("]", "").replace("[", ",").split(",")}
    assert {"create", "append", "acquire", "release"} <= kinds
    assert {"started", "reply", "called", "sent", "waiting", "sleeping", "now", "timer_fired"} <= kinds
    assert {"sub_started", "sub_ended", "cancelled", "delivered", "completed"} <= kinds
    assert any(e["kind"] == "sent" and e.get("due_at") for e in reference.events)  # a scheduled send(at=...)
    assert "Last call for dessert!" not in {line["text"] for line in reference.channel}  # cancelled in time
    assert reference.calls == Counter({"issue_ticket": 1, "confirm_booking": 1})
    assert ("out", "Goodbye, Ann! (bye)") in reference.transcript


# -- kill at the N-th write, resume in a new process ------------------------------------


@dataclass
class CrashCase:
    write: int  # the first worker dies at its write-th write...
    position: str  # ...before or after its commit
    label: str = ""
    then: tuple[int, str] | None = None  # the first resumer dies too, at this (write, position) of its own
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        again = f", then {self.then[1]} the resumer's write {self.then[0]}" if self.then else ""
        return f"kill {self.position} write {self.write} ({self.label}){again}"


def kill_points(writes: list[str]) -> list[tuple[int, str]]:
    """Which (write, position) to kill at: all of them, or MAX_CASES spread evenly that still include
    before and after the first write of every kind (create, append, acquire, release)."""
    points = [(n, position) for n in range(1, len(writes) + 1) for position in ("before", "after")]
    if os.environ.get("DYNAPROMPT_CRASH_ALL") or len(points) <= MAX_CASES:
        return points
    first_of_kind: dict[str, int] = {}
    for n, label in enumerate(writes, 1):
        first_of_kind.setdefault(label.partition("[")[0], n)
    chosen = {(n, position) for n in first_of_kind.values() for position in ("before", "after")}
    total = len(writes)
    # Writes evenly spaced over the run, positions alternating, so neither side clusters in one part.
    spread = MAX_CASES - len(chosen)
    chosen |= {(round(1 + i * (total - 1) / (spread - 1)), ("before", "after")[i % 2]) for i in range(spread)}
    return sorted(chosen)


def crash_and_resume(case: CrashCase, workdir: Path, reference: Reference) -> CrashCase:
    problems = case.problems
    acked: list[int] = []
    acked_texts: list[str] = []
    ran_when_recorded: dict[str, int] = {}  # call -> how often it had run when its result was first seen durable
    interrupted: Counter[str] = Counter()  # call -> killed processes that ran it but did not record it
    for write, position in [(case.write, case.position), *([case.then] if case.then else [])]:
        ran_before = Counter(label for label, _ in side_effects(workdir))
        killed = run_worker(
            "survey", "--dir", str(workdir), "--resume-from", str(max(acked, default=-1) + 1),
            "--kill-at", f"{write}:{position}",
        )  # fmt: skip
        if killed.returncode != KILLED:
            problems.append(f"worker was not killed at {write}:{position} (exit {killed.returncode}): {killed.stderr}")
            return case
        acked += acked_steps(killed.stdout)
        acked_texts += acked_replies(killed.stdout)
        recorded_at_crash = {call_label(e["name"]) for e in events(workdir) if e["kind"] == "called"}
        ran_at_crash = Counter(label for label, _ in side_effects(workdir))
        for label in recorded_at_crash:
            ran_when_recorded.setdefault(label, ran_at_crash[label])
        for label in ran_at_crash - ran_before:
            interrupted[label] += label not in recorded_at_crash

    resumed = run_worker("survey", "--dir", str(workdir), "--resume-from", str(max(acked, default=-1) + 1))
    if resumed.returncode != 0 or "DONE" not in resumed.stdout:
        problems.append(f"resume failed (exit {resumed.returncode}): {resumed.stderr[-800:]}")
        return case
    status, transcript = view(workdir, "crash.db", CONVERSATION)
    log = events(workdir)

    if status.state != "completed":
        problems.append(f"state {status.state}, error {status.error}")
    if transcript != reference.transcript:
        problems.append(f"transcript differs: {transcript} != {reference.transcript}")
    heard = Counter(text for direction, text in transcript if direction == "in")
    for text in acked_texts:
        if heard[text] != 1:
            problems.append(f"acknowledged reply {text!r} appears {heard[text]} times")

    # Calls: recorded once; a recorded call never runs again; an interrupted one ran at most once more.
    recorded = Counter(call_label(e["name"]) for e in log if e["kind"] == "called")
    ran = Counter(label for label, _ in side_effects(workdir))
    for label, expected in reference.calls.items():
        if recorded[label] != 1:
            problems.append(f"call {label} recorded {recorded[label]} times")
        if label in ran_when_recorded and ran[label] != ran_when_recorded[label]:
            problems.append(f"call {label} ran again after its result was recorded")
        if ran[label] != expected + interrupted[label]:
            problems.append(f"call {label} ran {ran[label]} times (interrupted mid-call {interrupted[label]} times)")

    # Bot messages: recorded once each, same log shape as uninterrupted (hand-off records aside).
    sent_texts = [e["text"] for e in log if e["kind"] == "sent"]
    if sorted(sent_texts) != sorted(e["text"] for e in reference.events if e["kind"] == "sent"):
        problems.append(f"sent events differ: {sent_texts}")
    shape = [e["kind"] for e in log if e["kind"] != "delivered"]
    if shape != [e["kind"] for e in reference.events if e["kind"] != "delivered"]:
        problems.append(f"log shape differs: {shape}")
    delivered = Counter(e["message_id"] for e in log if e["kind"] == "delivered")
    if any(count != 1 for count in delivered.values()):
        problems.append(f"a hand-off recorded twice: {delivered}")

    # Channel: at-least-once, one stable id per message, never later than uninterrupted.
    lines = channel_lines(workdir)
    texts_by_id: dict[str, set[str]] = {}
    ids_by_text: dict[str, set[str]] = {}
    for line in lines:
        texts_by_id.setdefault(line["id"], set()).add(line["text"])
        ids_by_text.setdefault(line["text"], set()).add(line["id"])
    if any(len(ids) != 1 for ids in ids_by_text.values()) or any(len(t) != 1 for t in texts_by_id.values()):
        problems.append(f"one message under two ids (or one id for two texts): {ids_by_text}")
    twice = [key for key, count in Counter((line["id"], line["pid"]) for line in lines).items() if count > 1]
    if twice:
        problems.append(f"one process handed a message over twice (not a crash re-delivery): {twice}")
    if first_delivery_step(lines) != first_delivery_step(reference.channel):
        problems.append(f"hand-off steps differ: {first_delivery_step(lines)}")
    return case


@pytest.fixture(scope="module")
def crash_cases(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> list[CrashCase]:
    writes = reference.writes
    cases = [CrashCase(n, position, writes[n - 1]) for n, position in kill_points(writes)]
    # Crashes during recovery: the resumer dies at one of its first writes (taking over the dead lease,
    # finishing the interrupted advance), and a third process finishes the job.
    firsts = [round(2 + i * (len(writes) - 8) / (DOUBLE_CASES - 1)) for i in range(DOUBLE_CASES)]
    cases += [
        CrashCase(n, ("after", "before")[i % 2], writes[n - 1], then=(1 + i % 3, ("before", "after")[i % 2]))
        for i, n in enumerate(firsts)
    ]
    root = tmp_path_factory.mktemp("crashes")

    def one(case: CrashCase) -> CrashCase:
        workdir = root / f"{case.write:03d}-{case.position}{'-again' if case.then else ''}"
        workdir.mkdir()
        return crash_and_resume(case, workdir, reference)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: one killed worker and one resumer at a time
        return list(pool.map(one, cases))


def test_kill_points_cover_before_and_after_every_kind_of_write(
    reference: Reference, crash_cases: list[CrashCase]
) -> None:
    covered = {(case.label.partition("[")[0], case.position) for case in crash_cases if case.then is None}
    kinds = {label.partition("[")[0] for label in reference.writes}
    assert covered == {(kind, position) for kind in kinds for position in ("before", "after")}


def test_resume_after_sigkill_at_any_write_loses_and_repeats_nothing(crash_cases: list[CrashCase]) -> None:
    failed = {str(case): case.problems for case in crash_cases if case.problems}
    assert not failed, "\n".join(f"{case}: {problems}" for case, problems in failed.items())


# -- killed by the parent while blocked inside a call() ------------------------------------


def read_until(process: subprocess.Popen[bytes], marker: str) -> list[str]:
    """Lines of ``process``'s stdout up to ``marker``; fails after TIMEOUT seconds instead of hanging.

    Reads the pipe's file descriptor directly: a buffered reader could hold the marker line in its
    buffer while ``select()`` waits on an empty pipe.
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    received = b""
    while marker.encode() + b"\n" not in received:
        if not selector.select(timeout=TIMEOUT):
            process.kill()
            pytest.fail(f"worker never printed {marker!r}; it printed {received!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(
                f"worker exited before {marker!r}: exit {process.wait(TIMEOUT)}, printed {received!r} (see worker.err)"
            )
        received += chunk
    selector.close()
    return received.decode().splitlines()


@pytest.mark.parametrize(
    ("blocked_call", "step", "minutes"),
    [("issue_ticket", 1, 1), ("confirm_booking", 4, 65)],
    ids=["in-deliver", "in-run-due"],
)
def test_parent_kills_worker_blocked_in_call_and_resume_takes_dead_lease_at_once(
    blocked_call: str, step: int, minutes: int, reference: Reference, tmp_path: Path
) -> None:
    env = worker_env()
    env["CRASH_BLOCK_CALL"] = blocked_call
    with (tmp_path / "worker.err").open("wb") as errors:  # a file, not a pipe nobody reads while we wait
        process = subprocess.Popen(
            [sys.executable, str(WORKER), "survey", "--dir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=errors,
            env=env,
        )
    try:
        seen = read_until(process, "BLOCKED")
        process.send_signal(signal.SIGKILL)
        assert process.wait(TIMEOUT) == KILLED
    finally:
        process.kill()
        process.communicate(timeout=TIMEOUT)
    assert max(acked_steps("\n".join(seen))) == step - 1
    owner, until = lease(tmp_path)
    assert owner is not None
    assert f":{process.pid}:" in owner  # the dead worker still holds the lease...
    resume_at = START + timedelta(minutes=minutes)
    assert until is not None
    assert until > resume_at.timestamp()  # ...past the instant the resumer runs at: it is not expired for it

    resumed = run_worker("survey", "--dir", str(tmp_path), "--resume-from", str(step))
    assert resumed.returncode == 0, resumed.stderr

    status, transcript = view(tmp_path, "crash.db", CONVERSATION)
    assert status.state == "completed"
    assert transcript == reference.transcript
    ran = Counter(label for label, _ in side_effects(tmp_path))
    assert ran == reference.calls + Counter({blocked_call: 1})  # the interrupted call ran again: at-least-once
    recorded = [e["name"] for e in events(tmp_path) if e["kind"] == "called"]
    assert sorted(map(call_label, recorded)) == ["confirm_booking", "issue_ticket"]
    # The resumer took the dead process's lease without waiting for it to expire: its messages went out at the
    # same step (the same virtual instant) as in the uninterrupted run.
    assert first_delivery_step(channel_lines(tmp_path)) == first_delivery_step(reference.channel)


# -- a changed dialog in a new process -------------------------------------------------------


def colour(workdir: Path, *args: str) -> dict[str, Any]:
    done = run_worker("colour", "--dir", str(workdir), *args)
    assert done.returncode == 0, done.stderr
    outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome


def test_changed_dialog_in_new_process_raises_nondeterminism_and_parks_until_fixed(tmp_path: Path) -> None:
    assert colour(tmp_path, "start") == {"state": "waiting_for_reply"}
    before = events(tmp_path, "colour.db", "colour-1")

    outcome = colour(tmp_path, "--changed", "deliver", "Red")

    assert outcome["raised"] == "NondeterminismError"
    assert outcome["conversation_id"] == "colour-1"
    assert outcome["seq"] == 2
    assert "'colour-1'" in outcome["message"]
    assert "seq 2" in outcome["message"]
    assert "send('Pick a colour.')" in outcome["message"]  # what the log recorded
    assert "send('Pick a colour, please.')" in outcome["message"]  # what the changed code yielded
    status, transcript = view(tmp_path, "colour.db", "colour-1")
    assert status.state == "failed"
    assert status.error is not None
    assert status.error.startswith("NondeterminismError")
    with sqlite3.connect(tmp_path / "colour.db") as connection:
        parked = connection.execute("SELECT parked FROM conversations WHERE id = 'colour-1'").fetchone()
    connection.close()
    assert parked == (1,)  # parked: it waits for fixed code (retry), not for more replies
    after = events(tmp_path, "colour.db", "colour-1")
    assert after[: len(before)] == before  # the log is untouched...
    assert [(e["kind"], e["text"]) for e in after[len(before) :]] == [("reply", "Red")]  # ...but for the reply
    assert transcript == [("out", "Pick a colour."), ("in", "Red")]
    assert [line["text"] for line in channel_lines(tmp_path, "colour_channel.jsonl")] == ["Pick a colour."]

    # The original code is deployed again: a third process resumes the parked conversation.
    assert colour(tmp_path, "retry") == {"state": "waiting_for_reply"}
    assert colour(tmp_path, "deliver", "thanks") == {"state": "completed"}
    _, transcript = view(tmp_path, "colour.db", "colour-1")
    assert transcript == [
        ("out", "Pick a colour."), ("in", "Red"), ("out", "Red it is."), ("in", "thanks"), ("out", "Bye (thanks)."),
    ]  # fmt: skip
