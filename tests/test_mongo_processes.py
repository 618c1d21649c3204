"""Real runner processes on a real MongoDB wire server: SIGKILLed anywhere, three at once, one killed holding leases.

``mongo_worker.py`` runs the runners; the tests read what they left through a plain pymongo
client (not through the code under test) and through the public API.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from pymongo import MongoClient

from dynaprompt import Runner, Status, open_store

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("mongo_worker.py")
CONVERSATION = "survey-1"  # crash_worker.CONVERSATION
TIMEOUT = 60  # seconds for any one wait on a worker: a hang fails the test instead of blocking CI
MAX_CASES = 10  # kill points: before and after the first write of every kind, the rest spread evenly
KILLED = -signal.SIGKILL


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER.parent), env.get("PYTHONPATH")]))
    env.pop("MONGO_WORKER_BLOCK", None)
    env.pop("CRASH_BLOCK_CALL", None)
    env.update(extra)
    return env


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=worker_env(), check=False,
    )  # fmt: skip


def stored_events(url: str, conversation: str = CONVERSATION) -> list[dict[str, Any]]:
    """The conversation's event documents as the server holds them."""
    with MongoClient(url, serverSelectionTimeoutMS=10_000) as client:
        docs = client.get_default_database()["events"].find({"conversation_id": conversation}, {"_id": 0})
        return list(docs.sort("seq", 1))


def view(url: str, conversation: str) -> tuple[Status, list[tuple[str, str]]]:
    """Status and transcript (direction, text) as the public API shows them."""

    async def read() -> tuple[Status, list[tuple[str, str]]]:
        store = await open_store(url)
        try:
            async with Runner(store) as runner:
                status = await runner.status(conversation)
                transcript = [(entry.direction, entry.text) for entry in await runner.transcript(conversation)]
        finally:
            await store.close()
        return status, transcript

    return anyio.run(read)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


# -- SIGKILL at the N-th driver write, resume in a new process -----------------------------


@dataclass
class Reference:
    writes: list[str]
    transcript: list[tuple[str, str]]
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def reference(mongodb_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    url = f"{mongodb_uri}/crash_reference"
    done = run_worker("survey", "--url", url, "--dir", str(tmp_path_factory.mktemp("reference")), "--count-writes")
    assert done.returncode == 0, done.stderr
    writes = [line.split(maxsplit=2)[2] for line in done.stdout.splitlines() if line.startswith("WRITE ")]
    status, transcript = view(url, CONVERSATION)
    assert status.state == "completed"
    return Reference(writes, transcript, stored_events(url))


def kind_of(write: str) -> str:
    """``events.insert_many[reply,sent]`` -> ``events.insert_many``."""
    return write.partition("[")[0]


def kill_points(writes: list[str]) -> list[tuple[int, str]]:
    points = [(n, position) for n in range(1, len(writes) + 1) for position in ("before", "after")]
    if os.environ.get("DYNAPROMPT_CRASH_ALL"):
        return points
    firsts: dict[str, int] = {}
    for n, write in enumerate(writes, 1):
        firsts.setdefault(kind_of(write), n)
    chosen = {(n, position) for n in firsts.values() for position in ("before", "after")}
    # The window a transaction would close: events in, row not yet updated (a reply, then a call's result).
    gaps = [n for n, write in enumerate(writes, 1) if write.startswith("events.insert_many[reply")]
    chosen |= {(n, "after") for n in gaps[:2]}
    spread = max(MAX_CASES - len(chosen), 2)
    chosen |= {points[round(i * (len(points) - 1) / (spread - 1))] for i in range(spread)}
    return sorted(chosen)


@dataclass
class CrashCase:
    write: int
    position: str
    label: str
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"kill {self.position} write {self.write} ({self.label})"


def crash_and_resume(case: CrashCase, url: str, workdir: Path, reference: Reference) -> CrashCase:
    problems = case.problems
    killed = run_worker("survey", "--url", url, "--dir", str(workdir), "--kill-at", f"{case.write}:{case.position}")
    if killed.returncode != KILLED:
        problems.append(f"worker was not killed (exit {killed.returncode}): {killed.stderr[-500:]}")
        return case
    acked = [int(line.split()[1]) for line in killed.stdout.splitlines() if line.startswith("ACK ")]
    acked_replies = [line.split(maxsplit=3)[3] for line in killed.stdout.splitlines() if " deliver " in line]
    recorded_at_crash = {e["name"] for e in stored_events(url) if e["kind"] == "called"}
    side_file = workdir / "side_effects.txt"
    ran_at_crash = (
        Counter(line.split("\t")[0] for line in side_file.read_text().splitlines()) if side_file.exists() else Counter()
    )

    resumed = run_worker(
        "survey", "--url", url, "--dir", str(workdir), "--resume-from", str(max(acked, default=-1) + 1)
    )
    if resumed.returncode != 0 or "DONE" not in resumed.stdout:
        problems.append(f"resume failed (exit {resumed.returncode}): {resumed.stderr[-800:]}")
        return case
    status, transcript = view(url, CONVERSATION)
    log = stored_events(url)
    if status.state != "completed":
        problems.append(f"state {status.state}, error {status.error}")
    if transcript != reference.transcript:
        problems.append(f"transcript differs: {transcript}")
    heard = Counter(text for direction, text in transcript if direction == "in")
    problems.extend(
        f"acknowledged reply {text!r} kept {heard[text]} times" for text in acked_replies if heard[text] != 1
    )
    if [e["seq"] for e in log] != list(range(1, len(log) + 1)):
        problems.append(f"sequence numbers not 1..n: {[e['seq'] for e in log]}")
    if [e["kind"] for e in log if e["kind"] != "delivered"] != [
        e["kind"] for e in reference.events if e["kind"] != "delivered"
    ]:
        problems.append(f"log shape differs: {[e['kind'] for e in log]}")
    if sorted(e["text"] for e in log if e["kind"] == "sent") != sorted(
        e["text"] for e in reference.events if e["kind"] == "sent"
    ):
        problems.append("bot messages recorded differently")
    delivered = Counter(e["message_id"] for e in log if e["kind"] == "delivered")
    if any(count != 1 for count in delivered.values()):
        problems.append(f"a hand-off recorded twice: {delivered}")
    ran = Counter(line.split("\t")[0] for line in side_file.read_text().splitlines())
    for name in {e["name"] for e in log if e["kind"] == "called"}:
        label = name.rpartition(":")[2]
        if name in recorded_at_crash and ran[label] != ran_at_crash[label]:
            problems.append(f"call {label} ran again after its result was recorded")
    ids_by_text: dict[str, set[str]] = {}
    for line in lines_of(workdir / "channel.jsonl"):
        ids_by_text.setdefault(line["text"], set()).add(line["id"])
    if any(len(ids) != 1 for ids in ids_by_text.values()):
        problems.append(f"one message handed over under two ids: {ids_by_text}")
    return case


@pytest.fixture(scope="module")
def crash_cases(reference: Reference, mongodb_uri: str, tmp_path_factory: pytest.TempPathFactory) -> list[CrashCase]:
    cases = [CrashCase(n, position, reference.writes[n - 1]) for n, position in kill_points(reference.writes)]
    root = tmp_path_factory.mktemp("mongo-crashes")

    def one(case: CrashCase) -> CrashCase:
        workdir = root / f"{case.write:03d}-{case.position}"
        workdir.mkdir()
        return crash_and_resume(case, f"{mongodb_uri}/crash_{case.write:03d}_{case.position}", workdir, reference)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, cases))


def test_reference_run_writes_every_kind_of_document(reference: Reference) -> None:
    kinds = {kind_of(write) for write in reference.writes}
    always = {
        "events.insert_many",  # the events of an append or a create
        "conversations.insert_one",  # a new conversation's row
        "conversations.update_one",  # an append's row update (a compare-and-swap, maybe releasing), a claim
        "conversations.find_one_and_update",  # a lease taken before a call (the row is read back)
    }
    assert always <= kinds
    assert kinds == always
    assert ("out", "Goodbye, Ann! (bye)") in reference.transcript


def test_kill_points_include_the_gap_between_an_events_insert_and_its_row_update(crash_cases: list[CrashCase]) -> None:
    gaps = [case for case in crash_cases if case.position == "after" and case.label.startswith("events.insert_many")]
    assert len(gaps) >= 2
    assert {(kind_of(case.label), case.position) for case in crash_cases} >= {
        (kind, position)
        for kind in (
            "events.insert_many",
            "conversations.insert_one",
            "conversations.update_one",
            "conversations.find_one_and_update",
        )
        for position in ("before", "after")
    }


def test_resume_after_sigkill_at_any_write_loses_and_repeats_nothing(crash_cases: list[CrashCase]) -> None:
    failed = {str(case): case.problems for case in crash_cases if case.problems}
    assert not failed, "\n".join(f"{case}: {problems}" for case, problems in failed.items())


# -- three runner processes on one database ---------------------------------------------------


class RunnerProcess:
    """``mongo_worker.py runner``: commands on stdin, answers collected from stdout by a thread."""

    def __init__(self, name: str, url: str, workdir: Path, *, lease_seconds: float = 30.0, block: bool = False) -> None:
        self.name = name
        env = worker_env(MONGO_WORKER_BLOCK="1") if block else worker_env()
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), "runner", "--url", url, "--dir", str(workdir), "--name", name,
             "--lease-seconds", str(lease_seconds), "--poll-interval", "0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr = ""

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def send(self, *commands: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("".join(f"{command}\n" for command in commands))
        self.process.stdin.flush()

    def wait_for(self, done: Callable[[list[str]], bool]) -> list[str]:
        """Collect answer lines until ``done(lines so far)``; fails after TIMEOUT instead of hanging."""
        deadline = time.monotonic() + TIMEOUT
        while not done(self.seen):
            try:
                self.seen.append(self.lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"runner {self.name} stalled; saw {self.seen[-5:]}; stderr {self.stderr()[-1500:]}")
        return self.seen

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        if self.process.stderr is not None and not self.process.stderr.closed:
            self._stderr = self.process.stderr.read()
            self.process.stderr.close()
        return self._stderr

    def quit(self) -> None:
        """Stop cleanly (or, if it is dead or wedged, kill it); close its pipes either way."""
        try:
            if self.process.poll() is None:
                self.send("quit")
                self.wait_for(lambda lines: "BYE" in lines)
        finally:
            if self.process.poll() is None and self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._close()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(TIMEOUT) == KILLED
        self._close()

    def _close(self) -> None:
        self._reader.join(TIMEOUT)
        self.stderr()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def answers(lines: list[str], word: str) -> list[str]:
    return [line.split(maxsplit=1)[1] for line in lines if line.startswith(word + " ")]


def settled(count: int) -> Callable[[list[str]], bool]:
    """Done once ``count`` deliveries were answered, acknowledged or not."""
    return lambda lines: len(answers(lines, "ACK")) + len(answers(lines, "ERR")) == count


async def single_runner_transcript(turns: int, replies: list[str]) -> list[tuple[str, str]]:
    """What one runner alone makes of these replies, delivered one by one (on the memory store)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mongo_worker", WORKER)  # registers its echo dialog here
    assert spec is not None
    assert spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    store = await open_store("memory://")
    async with Runner(store) as runner:
        await runner.start("mongo-echo", "alone", turns)
        for text in replies:
            await runner.deliver("alone", text)
        return [(entry.direction, entry.text) for entry in await runner.transcript("alone")]


View = tuple[Status, list[tuple[str, str]]]


def wait_until(url: str, conversations: list[str], done: Callable[[list[tuple[str, str]]], bool]) -> dict[str, View]:
    """Poll the public API until ``done(transcript)`` holds for every conversation; after TIMEOUT the
    views as they are (the test's assertions then say what is missing), not a hang."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        views = {cid: view(url, cid) for cid in conversations}
        if all(done(transcript) for _, transcript in views.values()) or time.monotonic() > deadline:
            return views
        time.sleep(0.2)


def wait_until_completed(url: str, conversations: list[str]) -> dict[str, View]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        views = {cid: view(url, cid) for cid in conversations}
        if all(status.state == "completed" for status, _ in views.values()) or time.monotonic() > deadline:
            return views
        time.sleep(0.2)


def test_three_runners_with_concurrent_replies_consume_each_once_and_match_a_single_runner(
    mongodb_url: str, tmp_path: Path
) -> None:
    conversations = [f"talk-{n}" for n in range(6)]
    turns = 6
    runners = [RunnerProcess(name, mongodb_url, tmp_path) for name in ("a", "b", "c")]
    try:
        runners[0].send(*(f"start {cid} {turns}" for cid in conversations))
        runners[0].wait_for(lambda lines: len(answers(lines, "STARTED")) == len(conversations))
        # Reply j of every conversation goes to runner j % 3: all three get theirs in one burst, at once.
        bursts: list[list[str]] = [[], [], []]
        for cid in conversations:
            for j in range(turns):
                bursts[j % 3].append(f"deliver {cid} {cid}/r{j}")
        for runner, burst in zip(runners, bursts, strict=True):
            runner.send(*burst)
        for runner, burst in zip(runners, bursts, strict=True):
            runner.wait_for(settled(len(burst)))
        errors = [line for runner in runners for line in answers(runner.seen, "ERR")]
        views = wait_until_completed(mongodb_url, conversations)
    finally:
        for runner in runners:
            runner.quit()

    assert not errors, errors
    for cid, (status, transcript) in views.items():
        assert status.state == "completed", (cid, status)
        heard = [text for direction, text in transcript if direction == "in"]
        assert sorted(heard) == sorted(f"{cid}/r{j}" for j in range(turns))  # every reply, each once
        # One runner fed the same replies in the order the store recorded them says the same, message for
        # message (the interleaving of in and out may differ: a burst waits in the queue).
        alone = anyio.run(single_runner_transcript, turns, heard)
        assert [text for direction, text in transcript if direction == "out"] == [
            text for direction, text in alone if direction == "out"
        ]
        events = stored_events(mongodb_url, cid)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert Counter(e["text"] for e in events if e["kind"] == "sent") == Counter(
            text for direction, text in alone if direction == "out"
        )  # each bot message recorded exactly once
        assert Counter(e["text"] for e in events if e["kind"] == "reply") == Counter(heard)
    handed = {line["id"] for name in "abc" for line in lines_of(tmp_path / f"channel-{name}.jsonl")}
    recorded = {
        f"{cid}:{e['seq']}" for cid in conversations for e in stored_events(mongodb_url, cid) if e["kind"] == "sent"
    }
    assert handed == recorded  # every message reached a channel, under its stable id


def test_runner_killed_holding_leases_leaves_its_conversations_to_the_others_after_expiry(
    mongodb_url: str, tmp_path: Path
) -> None:
    conversations = [f"held-{n}" for n in range(3)]
    lease_seconds = 1.5
    others = [RunnerProcess(name, mongodb_url, tmp_path, lease_seconds=lease_seconds) for name in ("a", "b")]
    victim = RunnerProcess("victim", mongodb_url, tmp_path, lease_seconds=lease_seconds, block=True)
    try:
        others[0].send(*(f"start {cid} 2" for cid in conversations))
        others[0].wait_for(lambda lines: len(answers(lines, "STARTED")) == len(conversations))
        victim.send(*(f"deliver {cid} {cid}/first" for cid in conversations))
        victim.wait_for(lambda lines: len(answers(lines, "BLOCKED")) == len(conversations))  # mid-call, leases held
        with MongoClient(mongodb_url) as client:
            rows = client.get_default_database()["conversations"]
            owners = {row["lease_owner"] for row in rows.find({"_id": {"$in": conversations}})}
        assert len(owners) == 1
        assert f":{victim.process.pid}:" in owners.pop()
        victim.kill()
        # No reply goes to the others meanwhile (a deliver() would take a dead process's lease at once):
        # their serve() loops must find the leases expired and finish the turns the victim began.
        wait_until(mongodb_url, conversations, lambda transcript: len(transcript) == 3)
        others[1].send(*(f"deliver {cid} {cid}/second" for cid in conversations))
        views = wait_until_completed(mongodb_url, conversations)
    finally:
        if victim.process.poll() is None:
            victim.kill()
        for runner in others:
            runner.quit()

    assert answers(others[1].seen, "ERR") == []
    assert sorted(answers(others[1].seen, "ACK")) == [f"{cid} {cid}/second" for cid in conversations]
    for cid, (status, transcript) in views.items():
        assert status.state == "completed", (cid, status)
        assert transcript == [
            ("out", "ready"),
            ("in", f"{cid}/first"),
            ("out", f"got {cid}/first ({cid.upper()}/FIRST)"),
            ("in", f"{cid}/second"),
            ("out", f"got {cid}/second ({cid.upper()}/SECOND)"),
        ]
