"""The cold resume of one long conversation, alone: its figure and where its time goes.

``python benchmarks/bench_cold.py`` builds a conversation of ``--events`` events (10,000 by default) with
``bench_core``'s dialog on a SQLite file (and on ``memory://``), then times ``--repeats`` cold resumes: a new
store object and a new runner with ``cache_size=0`` deliver one reply (load, validate every event, replay,
append, hand off). It prints the median wall-clock and process CPU time, the wall time the cyclic garbage
collector's passes took within it (``gc.callbacks``), and the median of each stage timed alone (the SQL
read, the validation, the replay). Before each cold deliver it times a fixed pure-Python loop (the CPU
yardstick) and prints that loop and the deliver over it: the machine's speed at that moment.
``--ab OTHER_TREE`` runs the same script alternately against this tree and another checkout (one subprocess
each, interleaved, so both see the same load) and prints the two side by side.

This file reads the wall clock (``time.perf_counter``) on purpose: it measures the library.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_core import LOOP_ITERATIONS, CountingChannel, code_under_test, grow_log, python_loop_s

from dynaprompt import Runner, open_store


async def build(url: str, cid: str, size: int) -> None:
    store = await open_store(url)
    async with Runner(store, CountingChannel()) as builder:
        await grow_log(builder, store, cid, size)
    await store.close()


class CollectorClock:
    """Time spent in the cyclic garbage collector's passes (``gc.callbacks``), and how many ran, while active."""

    def __init__(self) -> None:
        self.ms = 0.0
        self.passes = 0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._began) * 1000
            self.passes += 1

    def __enter__(self) -> CollectorClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self)


def timed(samples: dict[str, list[float]], name: str, began: float, cpu_began: float) -> None:
    samples.setdefault(name, []).append((time.perf_counter() - began) * 1000)
    samples.setdefault(name + " cpu", []).append((time.process_time() - cpu_began) * 1000)


LOOP = f"CPU yardstick: {LOOP_ITERATIONS:,}-iteration loop"


def against_loop(samples: dict[str, list[float]], loop_s: float) -> None:
    """Record the loop timed just before the last cold deliver, and that deliver over it: the ratio the
    machine's speed at that moment cancels out of (see ``bench_core.python_loop_s``)."""
    samples.setdefault(LOOP, []).append(loop_s * 1000)
    samples.setdefault("cold deliver / that loop", []).append(samples["cold deliver"][-1] / (loop_s * 1000))


async def measure(url: str, cid: str, repeats: int) -> dict[str, float]:
    from dynaprompt.events import log_from_json
    from dynaprompt.replay import Execution
    from dynaprompt.runner import lookup

    samples: dict[str, list[float]] = {}
    shared = await open_store(url) if url.startswith("memory") else None
    for _ in range(repeats):
        store = shared or await open_store(url)
        gc.collect()
        loop_s = python_loop_s()
        began, cpu = time.perf_counter(), time.process_time()
        with CollectorClock() as collector:
            async with Runner(store, CountingChannel(), cache_size=0) as cold:
                await cold.deliver(cid, "cold")
        timed(samples, "cold deliver", began, cpu)
        against_loop(samples, loop_s)
        samples.setdefault("  of which the garbage collector's passes", []).append(collector.ms)
        samples.setdefault("  garbage collector's passes (count)", []).append(collector.passes)
        if shared is None:
            await store.close()
        store = shared or await open_store(url)
        db = getattr(store, "_db", None)
        if db is not None:  # the stages alone
            began, cpu = time.perf_counter(), time.process_time()
            count, _, joined = db.execute(
                "SELECT count(*), max(seq), group_concat(body, ',') FROM events WHERE conversation_id = ?", (cid,)
            ).fetchone()
            text = f"[{joined}]"
            timed(samples, "  SQL read + join", began, cpu)
            began, cpu = time.perf_counter(), time.process_time()
            events = log_from_json(text, 1, count)
            timed(samples, "  validation", began, cpu)
            assert events is not None
            samples.setdefault("  body bytes", []).append(len(text))
        else:
            events = await store.load(cid)
        began, cpu = time.perf_counter(), time.process_time()
        row = await store.get(cid)
        assert row is not None
        start_at = row.run_seq - 1
        started = events[start_at]
        execution = Execution.begin(cid, lookup(started.dialog), started, events[:start_at])  # type: ignore[attr-defined]
        execution.extend(events[start_at + 1 :])
        now = events[-1].at
        await execution.advance(now)
        timed(samples, "  replay (Execution.extend + advance)", began, cpu)
        began, cpu = time.perf_counter(), time.process_time()
        await execution.close()
        del execution, events
        timed(samples, "  freeing the events and execution", began, cpu)
        if shared is None:
            await store.close()
    return {name: statistics.median(values) for name, values in samples.items()}


async def main_async(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="bench-cold-") as folder:
            args.dir = folder
            return await main_async(args)
    url = f"sqlite:///{args.dir}/cold-{os.getpid()}.db"
    await build(url, "cold", args.events)
    results = {"sqlite": await measure(url, "cold", args.repeats)}
    memory_store = await open_store("memory://")
    await build_on(memory_store, "cold", args.events)
    results["memory://"] = await measure_memory(memory_store, "cold", args.repeats)
    return results


async def build_on(store: Any, cid: str, size: int) -> None:
    async with Runner(store, CountingChannel()) as builder:
        await grow_log(builder, store, cid, size)


async def measure_memory(store: Any, cid: str, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        gc.collect()
        loop_s = python_loop_s()
        began, cpu = time.perf_counter(), time.process_time()
        async with Runner(store, CountingChannel(), cache_size=0) as cold:
            await cold.deliver(cid, "cold")
        timed(samples, "cold deliver", began, cpu)
        against_loop(samples, loop_s)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(columns: dict[str, dict[str, dict[str, float]]]) -> None:
    names = list(columns)
    print(f"{'median of the repeats (ms)':46}" + "".join(f"{name:>22}" for name in names))
    first = columns[names[0]]
    for store in first:
        for figure in first[store]:
            cells = "".join(f"{columns[name][store].get(figure, float('nan')):>22,.2f}" for name in names)
            print(f"{store + ' ' + figure:46}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000, help="events in the conversation's log (10,000)")
    parser.add_argument("--repeats", type=int, default=15, help="cold resumes timed, median taken (15)")
    parser.add_argument("--dir", help="folder for the SQLite file (a new temporary one by default)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    parser.add_argument("--ab", metavar="OTHER_TREE", help="compare with another checkout, interleaved")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per tree with --ab (3)")
    args = parser.parse_args()
    if args.ab:
        trees = {"this tree": str(Path(__file__).parent.parent), Path(args.ab).name: args.ab}
        runs: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in reversed(trees.items()):
                env = {**os.environ, "PYTHONPATH": tree}
                done = subprocess.run(
                    [sys.executable, __file__, "--json", "--events", str(args.events), "--repeats", str(args.repeats)],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                runs[name].append(json.loads(done.stdout))
        # The median over the rounds of each round's median.
        columns = {
            name: {
                store: {fig: statistics.median(r[store][fig] for r in rounds) for fig in rounds[0][store]}
                for store in rounds[0]
            }
            for name, rounds in runs.items()
        }
        print(f"{args.events:,}-event log, {args.rounds} interleaved rounds x {args.repeats} resumes per tree")
        print_table(columns)
        return
    results = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{args.events:,}-event log, {args.repeats} cold resumes; {code_under_test()}")
        print_table({"": results})


if __name__ == "__main__":
    main()
