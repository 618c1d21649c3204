"""Benchmark of the dynaprompt core: throughput, restart, cold resume, memory; raw SQLite and a CPU loop as yardsticks.

Run ``python benchmarks/bench_core.py`` (``--n 1000 --k 10`` are the defaults; ``--help`` lists the
rest). Each store runs in its own child process, so every peak-memory figure belongs to one store
alone; the parent prints one table with the stores side by side.

A *turn* is one ``runner.deliver()``: the reply is recorded durably, the bot acknowledges it
("Got ...") and asks its next question (both sends recorded, then handed to the channel and marked
delivered), and it waits again, durably. The dialog behind every figure is ``chat`` below.

Throughput is measured twice: *sequential* (one ``deliver()`` at a time, K rounds over the N
conversations) and *concurrent* (``--concurrency`` tasks, all N by default, each taking a conversation
and doing its K turns, as a server handling many users does), where ``SQLiteStore`` lets writes that
are ready at the same time share one transaction (group commit). "Transactions per turn" counts the
COMMITs actually run (``SQLiteStore.commits``); "commits per turn" counts the durable write calls.

This file reads the wall clock (``time.perf_counter``) on purpose: it measures the library; the
library itself still takes all of its time from its runner's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import dynaprompt
from dynaprompt import Message, Runner, Store, dialog, open_store, send, wait_for_reply

# -- the workload ---------------------------------------------------------------------------------------------


@dialog(name="bench:chat")
def chat() -> Any:
    """Ask, wait, acknowledge, forever: every turn is send + wait + reply + send (+ delivered marks)."""
    turn = 0
    yield send(f"Question {turn}?")
    while True:
        reply = yield wait_for_reply()
        turn += 1
        yield send(f"Got {reply.text!r}.")
        yield send(f"Question {turn}?")


class CountingChannel:
    """Counts hand-offs and keeps nothing, so it adds no memory of its own."""

    def __init__(self) -> None:
        self.handed = 0

    async def deliver(self, message: Message) -> None:
        self.handed += 1


class CountingStore:
    """Wraps a store and counts its write calls. Run one at a time, each is exactly one transaction (one
    commit) in ``SQLiteStore``: ``create`` and ``append`` run in ``BEGIN IMMEDIATE ... COMMIT``, ``acquire``
    and ``release`` are single autocommitted ``UPDATE`` statements; run concurrently, several share one."""

    WRITES = ("create", "append", "acquire", "release")

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.url = inner.url
        self.writes: dict[str, int] = dict.fromkeys(self.WRITES, 0)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in self.WRITES:
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.writes[name] += 1
            return await attribute(*args, **kwargs)

        return counted


def conversation_ids(n: int, prefix: str = "c") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


async def run_turns(runner: Runner, ids: list[str], k: int) -> tuple[float, float]:
    """K rounds of one reply to every conversation; (wall seconds, CPU seconds of this process) taken."""
    began, cpu = time.perf_counter(), time.process_time()
    for turn in range(k):
        text = f"answer {turn}"
        for cid in ids:
            await runner.deliver(cid, text)
    return time.perf_counter() - began, time.process_time() - cpu


async def run_turns_concurrently(runner: Runner, ids: list[str], k: int, concurrency: int) -> tuple[float, float]:
    """``concurrency`` tasks, each taking the next conversation and delivering its K replies one after the
    other; (wall seconds, CPU seconds) until every conversation has had its K turns."""
    pending = iter(ids)

    async def worker() -> None:
        for cid in pending:  # shared iterator: each conversation goes to exactly one task
            for turn in range(k):
                await runner.deliver(cid, f"answer {turn}")

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(ids)) or len(ids))))
    return time.perf_counter() - began, time.process_time() - cpu


def transactions(store: Any) -> int | None:
    """COMMITs run so far by a ``SQLiteStore`` (``None`` for a store that does not count them)."""
    inner = getattr(store, "_inner", store)
    count = getattr(inner, "commits", None)
    return count if isinstance(count, int) else None


async def start_all(runner: Runner, ids: list[str]) -> float:
    began = time.perf_counter()
    for cid in ids:
        await runner.start(chat, cid)
    return time.perf_counter() - began


async def grow_log(builder: Runner, store: Store, cid: str, size: int) -> None:
    """Start ``chat`` as ``cid`` and deliver replies until its log holds about ``size`` events (6 a turn)."""
    await builder.start(chat, cid)
    row = await store.get(cid)
    assert row is not None
    while row.last_seq < size - 6:
        await builder.deliver(cid, "more")
        row = await store.get(cid)
        assert row is not None


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- one store's leg (a child process) ------------------------------------------------------------------------


class Leg:
    def __init__(self, kind: str, folder: Path, args: argparse.Namespace) -> None:
        self.kind = kind
        self.folder = folder
        self.args = args
        self.results: dict[str, Any] = {}
        self._files = 0

    def url(self, synchronous: str | None = None) -> str:
        if self.kind == "memory":
            return "memory://"
        self._files += 1
        url = f"sqlite:///{self.folder}/{self.kind}-{self._files}.db"
        return url if synchronous is None else f"{url}?synchronous={synchronous}"

    async def run(self) -> dict[str, Any]:
        args = self.args
        self.results["rss_after_import_mb"] = current_rss_mb()
        if self.kind == "sqlite-full":
            await self.throughput(self.url("full"), args.full_n, args.k)
            await self.concurrent_throughput(self.url("full"), args.full_n, args.k, args.concurrency)
            return self.results
        url = self.url()
        await self.throughput(url, args.n, args.k)
        self.results["peak_rss_mb"] = rss_mb()
        await self.concurrent_throughput(self.url(), args.n, args.k, args.concurrency)
        if self.kind == "sqlite" and args.procs > 1:
            await self.processes_throughput(self.url(), args.n, args.k, args.procs)
            await self.processes_throughput(self.url(), args.n, args.k, args.procs, tuned_gc=True)
        await self.traced_pass(args.n, args.k)
        if self.kind == "sqlite":
            await self.restart(url, args.n, args.k, min(args.live, args.n))
        await self.cold_resume(args.log_sizes, args.repeats)
        await self.idle_memory(args.idle)
        return self.results

    async def throughput(self, url: str, n: int, k: int) -> None:
        store = await open_store(url)
        ids = conversation_ids(n)
        async with Runner(store, CountingChannel()) as runner:
            started = await start_all(runner, ids)
            committed = transactions(store)
            took, cpu = await run_turns(runner, ids, k)
            after = transactions(store)
        self.results["transactions_per_turn"] = None if after is None else (after - (committed or 0)) / (n * k)
        self.results["starts_per_s"] = n / started
        self.results["turns_per_s"] = n * k / took
        self.results["turns_per_cpu_s"] = n * k / cpu
        self.results["turns"] = n * k
        self._kept = store  # the sqlite leg restarts on this file; memory:// keeps nothing to restart from
        if self.kind != "sqlite":
            await store.close()

    async def concurrent_throughput(self, url: str, n: int, k: int, concurrency: int) -> None:
        """The same turns on a fresh store, driven by ``concurrency`` tasks at once (0: one per conversation).
        The store is wrapped to count write calls (one coroutine frame per write, under 1% of a turn)."""
        store = CountingStore(await open_store(url))
        ids = conversation_ids(n)
        async with Runner(store, CountingChannel()) as runner:  # type: ignore[arg-type]
            await start_all(runner, ids)
            before, committed = dict(store.writes), transactions(store)
            took, cpu = await run_turns_concurrently(runner, ids, k, concurrency)
            after = transactions(store)
        await store.close()
        self.results["concurrency"] = min(concurrency, n) or n
        self.results["turns_per_s_concurrent"] = n * k / took
        self.results["turns_per_cpu_s_concurrent"] = n * k / cpu
        self.results["commits_per_turn_concurrent"] = sum(store.writes[w] - before[w] for w in store.writes) / (n * k)
        self.results["transactions_per_turn_concurrent"] = (
            None if after is None else (after - (committed or 0)) / (n * k)
        )

    async def processes_throughput(self, url: str, n: int, k: int, procs: int, *, tuned_gc: bool = False) -> None:
        """The concurrent turns again on a fresh file, split over ``procs`` runner processes sharing it (one
        per CPU, as a server deploys them; replies routed by conversation, as a load balancer with sticky
        sessions does). Wall clock from the moment every process is ready until the last one is done.
        ``tuned_gc``: each process sets up its garbage collector as docs/production.md recommends."""
        store = await open_store(url)
        ids = conversation_ids(n)
        async with Runner(store, CountingChannel()) as runner:
            await start_all(runner, ids)
        await store.close()
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--part", f"{i}/{procs}", "--url", url, "--n", str(n), "--k", str(k),
                *(["--tuned-gc"] if tuned_gc else []), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            for i in range(procs)
        ]  # fmt: skip
        for child in children:
            assert child.stdout is not None
            assert (await child.stdout.readline()).strip() == b"ready"
        began = time.perf_counter()
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
        parts = [json.loads((await child.communicate())[0]) for child in children]
        took = time.perf_counter() - began
        suffix = "_tuned_gc" if tuned_gc else ""
        self.results["procs"] = procs
        self.results[f"turns_per_s_procs{suffix}"] = n * k / took
        self.results[f"turns_per_cpu_s_procs{suffix}"] = n * k / sum(part["cpu"] for part in parts)

    async def traced_pass(self, n: int, k: int) -> None:
        """The same workload again, on a fresh store, wrapped to count commits and traced for the Python heap's
        peak. Slower than the timed pass; no timing is taken from it."""
        store = CountingStore(await open_store(self.url()))
        ids = conversation_ids(n)
        gc.collect()
        tracemalloc.start()
        try:
            async with Runner(store, CountingChannel()) as runner:  # type: ignore[arg-type]
                await start_all(runner, ids)
                before = dict(store.writes)
                await run_turns(runner, ids, k)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await store.close()
        writes = {name: store.writes[name] - before[name] for name in store.writes}
        self.results["writes_per_turn"] = {name: count / (n * k) for name, count in writes.items()}
        self.results["commits_per_turn"] = sum(writes.values()) / (n * k)
        self.results["heap_peak_mb"] = peak / 2**20

    async def restart(self, url: str, n: int, k: int, live: int) -> None:
        """Drop the runner and the store object; open both again on the same file and time until ``live``
        conversations have each been advanced by a delivered reply (each one is replayed cold)."""
        await self._kept.close()
        del self._kept
        gc.collect()
        began = time.perf_counter()
        store = await open_store(url)
        async with Runner(store, CountingChannel()) as runner:
            for cid in conversation_ids(n)[:live]:
                status = await runner.deliver(cid, "back again")
                assert status.state == "waiting_for_reply", status
            took = time.perf_counter() - began
        await store.close()
        self.results["restart_live"] = live
        self.results["restart_s"] = took
        self.results["restart_log_events"] = 1 + 1 + 1 + k * 6  # started, sent, delivered, waiting + 6 per turn

    async def cold_resume(self, sizes: list[int], repeats: int) -> None:
        """Grow one conversation's log to each size, then time a runner with ``cache_size=0`` delivering one
        reply to it (load + validate every event + replay + append + hand-off), the median of ``repeats``, in
        wall-clock time and in this process's CPU time (which other processes on the machine barely change)."""
        results: dict[str, float] = {}
        cpu_results: dict[str, float] = {}
        url = self.url()
        store = await open_store(url)
        async with Runner(store, CountingChannel()) as builder:
            for size in sizes:
                await grow_log(builder, store, f"log{size}", size)
        times: dict[int, list[float]] = {size: [] for size in sizes}
        cpu_times: dict[int, list[float]] = {size: [] for size in sizes}
        yardstick: list[float] = []
        largest = max(sizes)
        for _ in range(repeats):
            for size in sizes:
                # A new store object each time for SQLite: nothing warm survives from the build.
                if self.kind != "memory":
                    await store.close()
                    store = await open_store(url)
                if size == largest:  # the CPU's speed at this moment, right beside the resume it is read with
                    yardstick.append(python_loop_s())
                began, cpu_began = time.perf_counter(), time.process_time()
                async with Runner(store, CountingChannel(), cache_size=0) as cold:
                    await cold.deliver(f"log{size}", "cold")
                times[size].append(time.perf_counter() - began)
                cpu_times[size].append(time.process_time() - cpu_began)
        for size in sizes:
            row = await store.get(f"log{size}")
            assert row is not None
            results[str(size)] = statistics.median(times[size])
            cpu_results[str(size)] = statistics.median(cpu_times[size])
        await store.close()
        self.results["cold_resume_s"] = results
        self.results["cold_resume_cpu_s"] = cpu_results
        self.results["python_loop_s"] = statistics.median(yardstick)
        # Each of the largest log's resumes over the loop timed just before it: the CPU's speed cancels out.
        self.results["cold_resume_per_loop"] = statistics.median(
            took / loop for took, loop in zip(times[largest], yardstick, strict=True)
        )

    async def idle_memory(self, count: int) -> None:
        """Python heap retained per idle conversation (started, now waiting for a reply), cache off and on.

        On SQLite the store's data lives in SQLite's own allocator, outside the traced heap, so the figure is
        the runner's alone; on memory:// the store's dicts are in the heap too and are included."""
        for cache_size, label in ((0, "off"), (1024, "on")):
            store = await open_store(self.url())
            runner = Runner(store, CountingChannel(), cache_size=cache_size)
            await start_all(runner, conversation_ids(20, "warm"))  # warm statement and model caches
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                await start_all(runner, conversation_ids(count, "idle"))
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            await runner.aclose()
            await store.close()
            self.results[f"idle_bytes_cache_{label}"] = (after - before) / count
        self.results["idle_count"] = count


# -- the yardsticks: plain sqlite3, and the CPU --------------------------------------------------------------

LOOP_ITERATIONS = 1_000_000


def python_loop_s() -> float:
    """Seconds this process takes for a fixed pure-Python loop: the CPU yardstick for the cold resume.

    A cold resume is CPU work alone (validation, then the dialog re-run), and this machine's CPU speed moves
    by up to two times from minute to minute; the loop, timed beside each resume, moves with it (correlation
    about 0.84 over 40 interleaved pairs), so the ratio of the two says what the library costs, and the loop
    alone says how fast the machine was."""
    began = time.perf_counter()
    total = 0
    for i in range(LOOP_ITERATIONS):
        total += i
    return time.perf_counter() - began


def raw_sqlite(folder: Path, synchronous: str, seconds: float, cap: int) -> float:
    """Commits per second of plain sqlite3 with the store's PRAGMAs: one ~200-byte row inserted per
    ``BEGIN IMMEDIATE ... COMMIT``, into a table shaped like the event log."""
    db = sqlite3.connect(folder / f"raw-{synchronous}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute(
        "CREATE TABLE events (conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL, "
        "PRIMARY KEY (conversation_id, seq)) WITHOUT ROWID"
    )
    body = json.dumps({"seq": 0, "at": "2026-01-05T09:00:00Z", "kind": "sent", "text": "x" * 120, "metadata": {}})
    count = 0
    began, cpu = time.perf_counter(), time.process_time()
    while count < cap and time.perf_counter() - began < seconds:
        count += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO events VALUES (?, ?, ?)", (f"c{count % 1000:06d}", count, body))
        db.execute("COMMIT")
    took, cpu = time.perf_counter() - began, time.process_time() - cpu
    db.close()
    return count / took, count / cpu


async def run_part(url: str, part: str, n: int, k: int, tuned_gc: bool) -> None:
    """One of ``processes_throughput``'s runner processes: its share of the conversations, concurrently."""
    index, procs = (int(x) for x in part.split("/"))
    store = await open_store(url)
    async with Runner(store, CountingChannel()) as runner:
        if tuned_gc:  # as docs/production.md recommends for a busy runner process, once it is set up
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
        print("ready", flush=True)
        sys.stdin.readline()
        took, cpu = await run_turns_concurrently(runner, conversation_ids(n)[index::procs], k, 0)
    await store.close()
    print(json.dumps({"took": took, "cpu": cpu}), flush=True)


# -- the parent: run the legs, print the table -----------------------------------------------------------------


def code_under_test() -> str:
    """Which dynaprompt this process imported, and its commit: the scripts put only ``benchmarks/`` on
    ``sys.path``, so a checkout run without ``PYTHONPATH=<checkout>`` measures whatever the virtual
    environment has installed (an A/B run that forgot it measures one tree twice). Every script's header
    prints this line."""
    tree = Path(dynaprompt.__file__).resolve().parent.parent
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    if commit.returncode != 0:
        return f"dynaprompt {dynaprompt.__version__} from {tree}"
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, check=False).stdout.strip()  # fmt: skip
    return f"dynaprompt from {tree} at {commit.stdout.strip()}{' with uncommitted changes' if changed else ''}"


def run_leg(kind: str, argv: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--leg", kind, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {kind} leg failed (exit {done.returncode})")
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args: argparse.Namespace, legs: dict[str, dict[str, Any]]) -> str:
    memory, lite, full, raw = legs["memory"], legs["sqlite"], legs["sqlite-full"], legs["raw"]
    rows: list[tuple[str, str, str, str, str]] = []

    def row(name: str, mem: str, sql: str, target: str = "", durability: str = "") -> None:
        rows.append((name, mem, sql, target, durability))

    n, k = args.n, args.k
    row("turns per second", fmt(memory["turns_per_s"], ",.0f"), fmt(lite["turns_per_s"], ",.0f"), ">= 5,000",
        "kill: yes, power loss: no")  # fmt: skip
    row("turns per CPU-second (process CPU time)", fmt(memory["turns_per_cpu_s"], ",.0f"),
        fmt(lite["turns_per_cpu_s"], ",.0f"), "", "as above; robust to a busy machine")  # fmt: skip
    row("  conversations started per second", fmt(memory["starts_per_s"], ",.0f"), fmt(lite["starts_per_s"], ",.0f"))
    row(f"turns per second, synchronous=FULL ({args.full_n} x {k})", "", fmt(full["turns_per_s"], ",.0f"), "",
        "kill: yes, power loss: yes")  # fmt: skip
    row(f"turns per second, concurrent ({lite['concurrency']:,} tasks)", fmt(memory["turns_per_s_concurrent"], ",.0f"),
        fmt(lite["turns_per_s_concurrent"], ",.0f"), ">= 5,000", "kill: yes, power loss: no")  # fmt: skip
    row("turns per CPU-second, concurrent", fmt(memory["turns_per_cpu_s_concurrent"], ",.0f"),
        fmt(lite["turns_per_cpu_s_concurrent"], ",.0f"))  # fmt: skip
    if "procs" in lite:
        row(f"turns per second, concurrent, {lite['procs']} runner processes on one file", "n/a",
            fmt(lite["turns_per_s_procs"], ",.0f"), ">= 5,000", "kill: yes, power loss: no")  # fmt: skip
        row("  turns per CPU-second of those processes", "n/a", fmt(lite["turns_per_cpu_s_procs"], ",.0f"))
        row("  the same, garbage collector tuned (docs: production)", "n/a",
            fmt(lite["turns_per_s_procs_tuned_gc"], ",.0f"), ">= 5,000", "kill: yes, power loss: no")  # fmt: skip
        row("  turns per CPU-second of those processes", "n/a", fmt(lite["turns_per_cpu_s_procs_tuned_gc"], ",.0f"))
    row(f"turns per second, synchronous=FULL, concurrent ({full['concurrency']:,} tasks)", "",
        fmt(full["turns_per_s_concurrent"], ",.0f"), "", "kill: yes, power loss: yes")  # fmt: skip
    row("raw sqlite3 commits per second (NORMAL)", "", fmt(raw["normal"], ",.0f"), "", "kill: yes, power loss: no")
    row("raw sqlite3 commits per second (FULL)", "", fmt(raw["full"], ",.0f"), "", "kill: yes, power loss: yes")
    row("raw sqlite3 commits per CPU-second (NORMAL)", "", fmt(raw["normal_cpu"], ",.0f"))
    row("turns/s / raw commits/s (NORMAL)", "", fmt(lite["turns_per_s"] / raw["normal"], ".3f"))
    row("  the same, in CPU-seconds", "", fmt(lite["turns_per_cpu_s"] / raw["normal_cpu"], ".3f"))
    row("turns/s / raw commits/s (FULL)", "", fmt(full["turns_per_s"] / raw["full"], ".3f"))
    row("turns/s / raw commits/s (NORMAL), concurrent", "", fmt(lite["turns_per_s_concurrent"] / raw["normal"], ".3f"))
    row("turns/s / raw commits/s (FULL), concurrent", "", fmt(full["turns_per_s_concurrent"] / raw["full"], ".3f"))
    row(
        "commits per turn (durable writes)",
        fmt(memory["commits_per_turn"], ".2f"),
        fmt(lite["commits_per_turn"], ".2f"),
    )
    for name in CountingStore.WRITES:
        row(f"  {name}", fmt(memory["writes_per_turn"][name], ".2f"), fmt(lite["writes_per_turn"][name], ".2f"))
    row("  the same, concurrent", fmt(memory["commits_per_turn_concurrent"], ".2f"),
        fmt(lite["commits_per_turn_concurrent"], ".2f"))  # fmt: skip
    row("transactions per turn (COMMITs), sequential", "n/a", fmt(lite["transactions_per_turn"], ".3f"))
    row("transactions per turn (COMMITs), concurrent", "n/a", fmt(lite["transactions_per_turn_concurrent"], ".3f"))
    row("  the same, synchronous=FULL, concurrent", "n/a", fmt(full["transactions_per_turn_concurrent"], ".3f"))
    row(f"live again after restart ({lite['restart_live']} conversations, s)", "n/a",
        fmt(lite["restart_s"], ".3f"), "<= 0.2", "(reads)")  # fmt: skip
    for size, seconds in lite["cold_resume_s"].items():
        row(f"cold resume, {int(size):,}-event log (ms)", fmt(memory["cold_resume_s"][size] * 1000, ".2f"),
            fmt(seconds * 1000, ".2f"), "< 50" if int(size) == 10_000 else "", "")  # fmt: skip
        row("  the same, process CPU time (ms)", fmt(memory["cold_resume_cpu_s"][size] * 1000, ".2f"),
            fmt(lite["cold_resume_cpu_s"][size] * 1000, ".2f"))  # fmt: skip
    row(f"  CPU yardstick: a {LOOP_ITERATIONS:,}-iteration Python loop (ms)",
        fmt(memory["python_loop_s"] * 1000, ".2f"), fmt(lite["python_loop_s"] * 1000, ".2f"))  # fmt: skip
    row(f"  cold resume, {max(args.log_sizes):,}-event log / that loop", fmt(memory["cold_resume_per_loop"], ".2f"),
        fmt(lite["cold_resume_per_loop"], ".2f"))  # fmt: skip
    row("peak RSS, whole process (ru_maxrss, MB)", fmt(memory["peak_rss_mb"], ".1f"), fmt(lite["peak_rss_mb"], ".1f"),
        "< 100")  # fmt: skip
    row("  RSS after imports (MB)", fmt(memory["rss_after_import_mb"], ".1f"), fmt(lite["rss_after_import_mb"], ".1f"))
    row("peak Python heap during the turns (tracemalloc, MB)", fmt(memory["heap_peak_mb"], ".1f"),
        fmt(lite["heap_peak_mb"], ".1f"))  # fmt: skip
    row(f"heap per idle conversation, cache off ({lite['idle_count']:,}, bytes)", fmt(memory["idle_bytes_cache_off"],
        ",.0f") + "*", fmt(lite["idle_bytes_cache_off"], ",.0f"), "~0")  # fmt: skip
    row("heap per idle conversation, cache on (1,024 kept, bytes)", fmt(memory["idle_bytes_cache_on"], ",.0f") + "*",
        fmt(lite["idle_bytes_cache_on"], ",.0f"), "bounded")  # fmt: skip

    header = ("", "memory://", "sqlite:/// NORMAL", "target", "durability")
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = (
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded)

    load = os.getloadavg()[0]
    lines = [
        f"dynaprompt core benchmark: N={n:,} conversations x K={k} turns = {n * k:,} turns; "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at the end",
        code_under_test(),
        "",
        line(header),
        *(line(cells) for cells in rows),
    ]
    lines += [
        "",
        "A turn = deliver(): reply recorded, two sends recorded, handed off and marked delivered, wait recorded.",
        "Sequential: one deliver() at a time. Concurrent: that many tasks, each doing its conversations' K turns;",
        "runner processes: the conversations split over that many processes sharing the SQLite file.",
        "SQLite writes ready at the same time share one COMMIT (group commit), each durable before it returns.",
        "Durability: sqlite NORMAL (WAL) survives a process kill, may lose the last commits on power loss;",
        "FULL also survives power loss. memory:// survives neither. Restart and cold resume are reads plus one turn.",
        "* memory:// keeps its log in the Python heap, so its idle figures include the store itself.",
        "Peak RSS is per store: each store runs in its own process (interpreter and libraries included).",
        "Wall-clock figures suffer when other processes share the CPUs; CPU-second figures much less so.",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="conversations (default 1000)")
    parser.add_argument("--k", type=int, default=10, help="turns per conversation (default 10)")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="tasks delivering at once in the concurrent run (0: N)"
    )
    parser.add_argument("--full-n", type=int, default=100, help="conversations for the synchronous=FULL line (100)")
    parser.add_argument("--live", type=int, default=100, help="conversations that must be live after restart (100)")
    parser.add_argument("--idle", type=int, default=10_000, help="idle conversations for the memory figure (10000)")
    parser.add_argument("--log-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000, 10_000],
                        help="log sizes for the cold resume (100,1000,10000)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="cold resumes per log size, median taken (5)")
    parser.add_argument("--raw-seconds", type=float, default=1.0, help="how long each raw sqlite3 run lasts (1.0)")
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON after the table")
    parser.add_argument(
        "--procs", type=int, default=os.cpu_count() or 1, help="runner processes sharing one file (default: 1 per CPU)"
    )
    parser.add_argument("--leg", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tuned-gc", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.part is not None:
        asyncio.run(run_part(args.url, args.part, args.n, args.k, args.tuned_gc))
        return
    raw_argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="dynaprompt-bench-", dir=args.dir) as scratch:
        folder = Path(scratch)
        if args.leg is not None:
            if args.leg == "raw":
                normal, normal_cpu = raw_sqlite(folder, "NORMAL", args.raw_seconds, 1_000_000)
                full, full_cpu = raw_sqlite(folder, "FULL", args.raw_seconds, 1_000_000)
                figures: dict[str, Any] = {
                    "normal": normal,
                    "normal_cpu": normal_cpu,
                    "full": full,
                    "full_cpu": full_cpu,
                }
            else:
                figures = asyncio.run(Leg(args.leg, folder, args).run())
            print(json.dumps(figures))
            return
        child_argv = [a for a in raw_argv if a != "--json"]
        if args.dir is None:
            child_argv += ["--dir", scratch]
        legs = {kind: run_leg(kind, child_argv) for kind in ("raw", "memory", "sqlite", "sqlite-full")}
    print(report(args, legs))
    if args.json:
        print(json.dumps(legs, indent=2))


if __name__ == "__main__":
    main()
