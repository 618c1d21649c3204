"""Benchmark: many conversations asleep at once, woken by ``Runner.serve()`` on the system clock.

Run ``python benchmarks/bench_sleepers.py`` (``--n 10000 --spread 5`` are the defaults; ``--help``
lists the rest). N conversations each run ``sleeper`` below: ``sleep_until(instant)``, then
``send("awake")``. The instants are spread evenly over ``--spread`` seconds, starting once every
sleeper is asleep: they are started due a day ahead, then the runner's clock (the system clock) is
shifted by a constant so that the first falls due ``--margin`` seconds later, so setup may take as
long as it takes. A channel writes down the clock's time at which each ``awake`` message is handed
over; *lateness* is that time minus the instant the sleeper asked for, so it covers everything
between the timer falling due and the channel holding the message: the serve loop noticing it, the
due query, the lease, loading and replaying the log, the appends, the hand-off. The CPU time the
process spent serving, per wake-up, is printed beside it: it says how many wake-ups per second one
core can give, whatever else the machine is doing.

A second run per configuration (``--no-burst`` skips it) moves the clock past every instant at once and
calls ``run_due()`` once: its CPU time per wake-up is the cost of a wake-up alone, without ``serve()``'s
passes (their queries, and wake-ups too few per pass to share a commit), so a change to the wake-up path
shows there first.

Memory is measured while every sleeper sleeps (before the first one is due), in the same process
that started them and is serving them, against the same run with 0 sleepers: tracemalloc's current
and peak (Python allocations since a warmed-up baseline, traced in a separate run so tracing does
not slow the wake-ups) and the resident set size. It is measured with the live-generator cache off
(``Runner(cache_size=0)``) and with the default cache (1,024 entries): with the cache off a sleeper
costs the process nothing but its store rows; with it on, at most ``cache_size`` sleepers stay warm,
so memory stops growing at the cache's bound, whatever N is.

Each configuration runs in its own child process, so RSS figures belong to it alone. SQLite always
runs; MongoDB runs when ``--mongo-uri`` is given or ``DYNAPROMPT_TEST_MONGODB_URI`` is set (each
child uses a database of its own, dropped afterwards).

This file reads the wall clock on purpose: it measures the library; the library itself takes all of
its time from its runner's clock.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio

sys.path.insert(0, str(Path(__file__).parent))

from bench_core import code_under_test, raw_sqlite

from dynaprompt import Message, Runner, dialog, open_store, send, sleep_until
from dynaprompt.clock import SystemClock

TARGET_P99_MS = 50.0


@dialog(name="bench:sleeper")
def sleeper(wake_at: str) -> Any:
    """Sleep until ``wake_at`` (ISO), then say so."""
    yield sleep_until(datetime.fromisoformat(wake_at))
    yield send("awake")


class ShiftedClock:
    """The system clock plus a constant ``offset``.

    The sleepers are started due a day ahead, however long that takes; then the offset is set so that the
    first one falls due ``--margin`` seconds later. A constant offset changes nothing else: the runner
    sleeps with ``anyio.sleep`` on the real clock, exactly as with :class:`SystemClock`.
    """

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    async def sleep_until(self, instant: datetime) -> None:
        await anyio.sleep(max(0.0, (instant - self.now()).total_seconds()))


class StopwatchChannel:
    """Writes down when each conversation's first message is handed over (the clock's time, seconds)."""

    def __init__(self, expected: int, clock: ShiftedClock) -> None:
        self.handed: dict[str, float] = {}
        self.expected = expected
        self.clock = clock
        self.all_handed = anyio.Event()

    async def deliver(self, message: Message) -> None:
        self.handed.setdefault(message.conversation_id, self.clock.now().timestamp())
        if len(self.handed) >= self.expected:
            self.all_handed.set()


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best there is
        return peak_rss_mb()


def peak_rss_mb() -> float:
    scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


# -- one configuration (a child process) ------------------------------------------------------------------------


def store_url(kind: str, folder: Path, mongo_uri: str | None, label: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{folder / label}.db"
    assert mongo_uri is not None
    parts = urlsplit(mongo_uri)
    return urlunsplit((parts.scheme, parts.netloc, f"/dynaprompt_bench_{label}_{os.getpid()}", parts.query, ""))


async def discard(kind: str, url: str) -> None:
    """Remove a benchmark store: its SQLite files, or its MongoDB database."""
    if kind == "sqlite":
        path = url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)  # noqa: ASYNC240 - a benchmark's teardown, not a hot path
    else:
        await drop_mongo(url)


async def drop_mongo(url: str) -> None:
    try:
        from pymongo import AsyncMongoClient
    except ImportError:  # pragma: no cover - the mongo leg needs pymongo anyway
        return
    client: Any = AsyncMongoClient(url)
    try:
        await client.drop_database(urlsplit(url).path.lstrip("/"))
    finally:
        await client.close()


def plan_sleepers(count: int, first_at: datetime, spread: float) -> list[tuple[str, str, float]]:
    """(conversation id, ISO instant, timestamp) for ``count`` sleepers due evenly over ``spread`` seconds from
    ``first_at``, in shuffled order; built before the memory baseline, so the benchmark's own bookkeeping is
    not counted as the runner's."""
    offsets = [spread * i / max(1, count - 1) for i in range(count)]
    random.Random(7).shuffle(offsets)
    instants = [first_at + timedelta(seconds=offset) for offset in offsets]
    return [(f"s{i:06d}", instant.isoformat(), instant.timestamp()) for i, instant in enumerate(instants)]


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Runner`` options a configuration asks for (the runner's defaults for the rest)."""
    options: dict[str, Any] = {"cache_size": args.cache_size}
    if args.due_concurrency:
        options["due_concurrency"] = int(args.due_concurrency)
    if args.pass_interval:
        options["pass_interval"] = float(args.pass_interval)
    return options


def tune_collector(args: argparse.Namespace) -> None:
    """With ``--tuned-gc``, the collector as docs/production.md recommends for a process that serves a runner,
    once set up."""
    if args.tuned_gc:
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)


async def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """One child: start N sleepers, measure memory while they sleep, then (unless tracing) serve and time them."""
    folder = Path(args.dir)
    url = store_url(args.store, folder, args.mongo_uri, f"n{args.n}-cache{args.cache_size}-trace{int(args.trace)}")
    store = await open_store(url)
    result: dict[str, Any] = {
        "store": args.store, "n": args.n, "cache_size": args.cache_size, "trace": args.trace, "burst": args.burst,
    }  # fmt: skip
    options = runner_options(args)
    if "due_concurrency" in options:
        result["due_concurrency"] = options["due_concurrency"]
    try:
        if args.trace:
            tracemalloc.start()
        clock = ShiftedClock()
        channel = StopwatchChannel(args.n, clock)
        async with Runner(store, channel, clock=clock, **options) as runner:
            result.setdefault("due_concurrency", getattr(runner, "due_concurrency", 1))  # 1: one after another
            result["pass_interval_ms"] = getattr(runner, "pass_interval", 0.0) * 1000  # 0: passes back to back
            # Due a day from now; once all sleep, the clock is moved so the first is due --margin seconds later.
            first_at = clock.now() + timedelta(days=1)
            plan = plan_sleepers(args.n, first_at, args.spread)
            due = {conversation_id: timestamp for conversation_id, _, timestamp in plan}
            # Warm up, so that one-time costs (imports, schemas, statement caches, the first pass's look for
            # dead runners' leases) land before the baseline: one sleeper due in a month, one pass.
            await runner.start(sleeper, "warm-up", (clock.now() + timedelta(days=30)).isoformat())
            await runner.run_due()
            gc.collect()
            tune_collector(args)
            result["gc"] = "tuned" if args.tuned_gc else "default"
            rss_before = current_rss_mb()
            if args.trace:
                tracemalloc.reset_peak()
            traced_before = tracemalloc.get_traced_memory()[0] if args.trace else 0
            began = time.perf_counter()
            for conversation_id, instant, _ in plan:
                await runner.start(sleeper, conversation_id, instant)
            result["setup_seconds"] = time.perf_counter() - began
            gc.collect()
            if args.trace:
                current, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                result["traced_mb"] = (current - traced_before) / 2**20
                result["traced_peak_mb"] = (peak - traced_before) / 2**20
            result["rss_mb"] = current_rss_mb()
            result["rss_base_mb"] = rss_before
            result["rss_growth_mb"] = result["rss_mb"] - rss_before
            result["cached"] = len(runner._cache)
            if args.trace or args.n == 0:
                return result
            if args.burst:
                # Every sleeper due at once, one run_due(): what a wake-up costs, whatever serve()'s passes do.
                clock.offset = first_at + timedelta(seconds=args.spread + 1) - SystemClock().now()
                commits_before = getattr(store, "commits", None)
                gc.collect()
                cpu_before, wall_before = time.process_time(), time.perf_counter()
                result["woken"] = await runner.run_due()
                result["burst_wall_s"] = time.perf_counter() - wall_before
                result["cpu_ms_per_wake"] = (time.process_time() - cpu_before) * 1000 / max(1, result["woken"])
                if commits_before is not None:
                    result["commits_per_wake"] = (store.commits - commits_before) / max(1, result["woken"])
                result["load_average"] = os.getloadavg()[0]
                return result
            clock.offset = first_at - timedelta(seconds=args.margin) - SystemClock().now()
            result["processes"] = args.processes
            if args.processes > 1:
                # Served by that many other processes on the same store, none of them this one.
                handed, cpu_seconds, commits = await serve_elsewhere(args, url, clock.offset, first_at)
                woken: set[str] = set().union(*handed)
                result["duplicates"] = sum(len(part) for part in handed) - len(woken)
                channel.handed = {cid: min(part[cid] for part in handed if cid in part) for cid in woken}
                result["cpu_ms_per_wake"] = cpu_seconds * 1000 / max(1, len(channel.handed))
                if commits is not None:
                    result["commits_per_wake"] = commits / max(1, len(channel.handed))
            else:
                commits_before = getattr(store, "commits", None)  # SQLite counts its transactions
                cpu_before, wall_before = time.process_time(), time.time()
                with anyio.move_on_after(args.margin + args.spread + args.timeout) as scope:
                    async with anyio.create_task_group() as group:
                        group.start_soon(runner.serve)
                        await channel.all_handed.wait()
                        group.cancel_scope.cancel()
                result["timed_out"] = scope.cancelled_caught
                # CPU per wake-up is what a core must give; wall time beyond it was spent waiting (I/O, others).
                result["cpu_ms_per_wake"] = (time.process_time() - cpu_before) * 1000 / max(1, len(channel.handed))
                if commits_before is not None:
                    result["commits_per_wake"] = (store.commits - commits_before) / max(1, len(channel.handed))
                result["serve_seconds"] = time.time() - wall_before
            result["load_average"] = os.getloadavg()[0]
            late_ms = sorted((channel.handed[cid] - due[cid]) * 1000 for cid in channel.handed)
            result["woken"] = len(late_ms)
            if late_ms:
                result["late_ms"] = {
                    "min": late_ms[0], "p50": percentile(late_ms, 0.50), "p90": percentile(late_ms, 0.90),
                    "p99": percentile(late_ms, 0.99), "max": late_ms[-1], "mean": statistics.fmean(late_ms),
                }  # fmt: skip
            result["early"] = sum(1 for value in late_ms if value < 0)
        return result
    finally:
        await store.close()
        await discard(args.store, url)


async def serve_elsewhere(
    args: argparse.Namespace, url: str, offset: timedelta, first_at: datetime
) -> tuple[list[dict[str, float]], float, int | None]:
    """Serve the sleepers from ``args.processes`` processes at once, each a runner of its own on ``url`` (the
    sleepers' store) with the same clock: what each handed over when, their CPU seconds and commits in all."""
    last_at = first_at + timedelta(seconds=args.spread)
    argv = [
        sys.executable, __file__, "--serve-child", url, "--cache-size", str(args.cache_size),
        "--offset", str(offset.total_seconds()), "--last-at", last_at.isoformat(),
        "--timeout", str(args.margin + args.spread + args.timeout),
        *(["--pass-interval", args.pass_interval] if args.pass_interval else []),
        *(["--due-concurrency", args.due_concurrency] if args.due_concurrency else []),
        *(["--tuned-gc"] if args.tuned_gc else []),
    ]  # fmt: skip

    def run_all() -> list[str]:
        servers = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
        outputs = [server.communicate()[0] for server in servers]
        if any(server.returncode for server in servers):
            raise RuntimeError(f"a serving process failed: {[server.returncode for server in servers]}")
        return outputs

    parts = [json.loads(out.strip().splitlines()[-1]) for out in await anyio.to_thread.run_sync(run_all)]
    commits = [part["commits"] for part in parts]
    return (
        [part["handed"] for part in parts],
        sum(part["cpu"] for part in parts),
        None if None in commits else sum(commits),
    )


async def serve_child(args: argparse.Namespace) -> dict[str, Any]:
    """One of ``serve_elsewhere``'s processes: serve until nothing due by the last instant is left."""
    store = await open_store(args.serve_child)
    clock = ShiftedClock()
    channel = StopwatchChannel(sys.maxsize, clock)
    last_at = datetime.fromisoformat(args.last_at)
    try:
        async with Runner(store, channel, clock=clock, **runner_options(args)) as runner:
            gc.collect()
            tune_collector(args)
            clock.offset = timedelta(seconds=args.offset)
            commits_before = getattr(store, "commits", None)
            cpu_before = time.process_time()

            async def until_all_woken() -> None:
                # Done when every sleeper is (no wake-up left up to the last instant, nothing due or held).
                while True:
                    await anyio.sleep(0.1)
                    now = clock.now()
                    if now <= last_at:
                        continue
                    next_at = await store.next_wake_at()
                    if (
                        (next_at is None or next_at > last_at)
                        and not await store.due(now, 1)
                        and not await store.leased()
                    ):
                        return

            with anyio.move_on_after(args.timeout):
                async with anyio.create_task_group() as group:
                    group.start_soon(runner.serve)
                    await until_all_woken()
                    group.cancel_scope.cancel()
            cpu = time.process_time() - cpu_before
            commits = None if commits_before is None else store.commits - commits_before  # type: ignore[attr-defined]
    finally:
        await store.close()
    return {"handed": channel.handed, "cpu": cpu, "commits": commits}


# -- the parent: run the children, print the table --------------------------------------------------------------


def run_child(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"a benchmark child failed (exit {done.returncode}): {' '.join(argv)}")
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def report(args: argparse.Namespace, runs: list[dict[str, Any]], yardstick: list[float]) -> str:
    lines = [
        f"dynaprompt sleepers: {args.n} conversations asleep, due evenly over {args.spread:g} s, "
        "woken by Runner.serve() on the system clock",
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; lateness = hand-off wall time - requested instant",
        code_under_test(),
        "the machine's speed, before / after the runs: raw sqlite3 commits per second (bench_core's yardstick) "
        + " / ".join(f"{rate:,.0f}" for rate in yardstick),
        "",
        f"{'store':<7}{'cache':>6}{'procs':>6}{'conc':>5}{'pass ms':>8}{'gc':>8}{'setup s':>9}{'woken':>8}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'cpu ms/wake':>12}{'wakes/cpu s':>12}{'commits/wake':>13}{'load':>6}  verdict",
    ]
    for run in runs:
        if run["trace"] or run["n"] == 0 or run.get("burst"):
            continue
        late = run.get("late_ms", {})
        if "error" in run:
            verdict = run["error"]
        elif run.get("woken", 0) < run["n"]:
            verdict = f"only {run.get('woken', 0)} of {run['n']} woke before the timeout"
        else:
            verdict = "meets" if late["p99"] < TARGET_P99_MS else "MISSES"
            verdict += f" the p99 < {TARGET_P99_MS:g} ms target"
            if run["early"]:
                verdict += f"; {run['early']} EARLY"
            if run.get("duplicates"):
                verdict += f"; {run['duplicates']} HANDED TWICE"
        lines.append(
            f"{run['store']:<7}{run['cache_size']:>6}{run.get('processes', 1):>6}{run.get('due_concurrency', 1):>5}"
            f"{run.get('pass_interval_ms', 0.0):>8g}{run.get('gc', 'default'):>8}"
            f"{run['setup_seconds']:>9.1f}{run.get('woken', 0):>8}"
            f"{late.get('p50', float('nan')):>9.1f}{late.get('p99', float('nan')):>9.1f}"
            f"{late.get('max', float('nan')):>9.1f}{run.get('cpu_ms_per_wake', float('nan')):>12.3f}"
            f"{1000 / run.get('cpu_ms_per_wake', float('nan')):>12.0f}"
            f"{run.get('commits_per_wake', float('nan')):>13.3f}"
            f"{run.get('load_average', float('nan')):>6.1f}  {verdict}"
        )
    bursts = [run for run in runs if run.get("burst")]
    if bursts:
        lines += [
            "",
            f"all {args.n} due at once, one run_due() (the cost of a wake-up, without serve()'s passes):",
            f"{'store':<7}{'cache':>6}{'conc':>5}{'woken':>8}{'wall s':>8}{'cpu ms/wake':>12}{'wakes/cpu s':>12}"
            f"{'commits/wake':>13}{'load':>6}",
        ]
        for run in bursts:
            lines.append(
                f"{run['store']:<7}{run['cache_size']:>6}{run.get('due_concurrency', 1):>5}{run.get('woken', 0):>8}"
                f"{run.get('burst_wall_s', float('nan')):>8.2f}{run.get('cpu_ms_per_wake', float('nan')):>12.3f}"
                f"{1000 / run.get('cpu_ms_per_wake', float('nan')):>12.0f}"
                f"{run.get('commits_per_wake', float('nan')):>13.3f}{run.get('load_average', float('nan')):>6.1f}"
            )
    lines += [
        "",
        "memory while they sleep (the process that started them and serves them), vs 0 sleepers:",
        f"{'store':<7}{'cache':>6}{'sleepers':>10}{'traced MB':>11}{'traced peak':>13}{'RSS base':>10}"
        f"{'RSS MB':>9}{'RSS growth':>12}{'cached':>8}",
    ]
    for run in runs:
        if not (run["trace"] or run["n"] == 0):
            continue
        lines.append(
            f"{run['store']:<7}{run['cache_size']:>6}{run['n']:>10}{run.get('traced_mb', float('nan')):>11.2f}"
            f"{run.get('traced_peak_mb', float('nan')):>13.2f}{run.get('rss_base_mb', float('nan')):>10.1f}"
            f"{run['rss_mb']:>9.1f}{run['rss_growth_mb']:>12.1f}"
            f"{run['cached']:>8}"
        )
    lines += [
        "",
        "cpu ms/wake = this process's CPU time while serving / wake-ups: 1000 / it is the most wake-ups per second",
        "one core can give (wakes/cpu s); procs 2 = two runner processes serve the same store file at once (their",
        "CPU time added up; each conversation is woken by one of them, claimed before its log is read);",
        "commits/wake = SQLite transactions per wake-up (writes of conversations",
        "woken together share one); load = the machine's 1-minute load average then (other processes competing).",
        "traced = Python allocations still held once every sleeper sleeps, since a warmed-up baseline (one",
        "sleeper started, one pass run); peak includes the transient garbage of starting them. RSS includes",
        "SQLite's own page cache (bounded by its cache_size pragma); RSS base is taken at that baseline, after",
        "the benchmark's own plan of N wake times is built; growth is RSS minus base.",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="sleeping conversations (default 10000)")
    parser.add_argument("--spread", type=float, default=5.0, help="seconds over which they fall due (default 5)")
    parser.add_argument("--margin", type=float, default=1.0, help="seconds between setup's end and the first wake-up")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for stragglers (default 60)")
    parser.add_argument(
        "--mongo-uri", default=os.environ.get("DYNAPROMPT_TEST_MONGODB_URI"),
        help="also run on MongoDB at this URI (default: $DYNAPROMPT_TEST_MONGODB_URI)",
    )  # fmt: skip
    parser.add_argument("--cache", default="0,1024", help="cache sizes to run, comma-separated (default 0,1024)")
    parser.add_argument(
        "--due-concurrency", default="",
        help="Runner(due_concurrency=...) values to run, comma-separated, e.g. 1,64 (default: the runner's default)",
    )  # fmt: skip
    parser.add_argument(
        "--pass-interval", default="",
        help="Runner(pass_interval=...) values in seconds, comma-separated, e.g. 0,0.005 (default: the runner's)",
    )  # fmt: skip
    parser.add_argument(
        "--tuned-gc", action="store_true",
        help="also serve with the collector tuned as docs/production.md recommends (gc.freeze(), a higher threshold)",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the traced memory runs")
    parser.add_argument("--no-burst", action="store_true", help="skip the all-due-at-once run_due() runs")
    parser.add_argument("--dir", default=None, help="where the SQLite files go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON after the table")
    parser.add_argument(
        "--processes", default="1,2",
        help="runner processes serving the sleepers together, comma-separated (default 1,2: one, then two on one "
        "store; SQLite only)",
    )  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--last-at", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--processes-here", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--store", default="sqlite", help=argparse.SUPPRESS)
    parser.add_argument("--cache-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--burst", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def machine_speed() -> float:
    """Plain sqlite3 commits per second for one second, in a folder of its own (bench_core's yardstick)."""
    with tempfile.TemporaryDirectory(prefix="dynaprompt-yardstick-") as folder:
        return raw_sqlite(Path(folder), "NORMAL", 1.0, 1_000_000)[0]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.serve_child:
        print(json.dumps(anyio.run(serve_child, args)))
        return
    if args.child:
        args.processes = args.processes_here
        print(json.dumps(anyio.run(run_config, args)))
        return
    with tempfile.TemporaryDirectory(prefix="dynaprompt-sleepers-") as scratch:
        folder = args.dir or scratch
        stores = ["sqlite"] + (["mongo"] if args.mongo_uri else [])
        runs: list[dict[str, Any]] = []
        # How fast this machine is now (a shared machine's speed moves with its neighbours' load): one second of
        # plain sqlite3 commits before the runs and one after, as bench_core measures its yardstick.
        yardstick = [machine_speed()]
        for kind in stores:
            for cache_size in [int(size) for size in args.cache.split(",")]:
                common = ["--store", kind, "--cache-size", str(cache_size), "--dir", str(folder)]
                common += ["--spread", str(args.spread), "--margin", str(args.margin), "--timeout", str(args.timeout)]
                if args.mongo_uri:
                    common += ["--mongo-uri", args.mongo_uri]
                timed = [
                    run_child(
                        [
                            *common,
                            *["--n", str(args.n)],
                            *(["--due-concurrency", size] if size else []),
                            *(["--pass-interval", interval] if interval else []),
                        ]
                    )
                    for size in args.due_concurrency.split(",")
                    for interval in args.pass_interval.split(",")
                ]
                timed += [
                    run_child([*common, "--n", str(args.n), "--processes-here", processes])
                    for processes in args.processes.split(",")
                    if int(processes) > 1 and kind == "sqlite" and cache_size == 0
                ]
                if args.tuned_gc:
                    timed.append(run_child([*common, "--n", str(args.n), "--tuned-gc"]))
                runs += timed
                if not args.no_burst:
                    runs.append(run_child([*common, "--n", str(args.n), "--burst"]))
                if not args.no_memory:
                    runs.append(run_child([*common, "--n", "0", "--trace"]))
                    runs.append(run_child([*common, "--n", str(args.n), "--trace"]))
                else:
                    runs.append(run_child([*common, "--n", "0"]))
                    runs.append({**timed[0], "trace": True})
    yardstick.append(machine_speed())
    print(report(args, runs, yardstick))
    if args.json:
        print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
