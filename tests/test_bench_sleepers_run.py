"""benchmarks/bench_sleepers.py still runs end to end (tiny N; the figures themselves are not judged here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_benchmark

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sleepers.py"


def test_the_sleepers_benchmark_wakes_every_sleeper_and_prints_its_table(tmp_path: Path) -> None:
    printed = run_benchmark(
        BENCH, "--n", "20", "--spread", "0.2", "--margin", "1", "--timeout", "30", "--cache", "0",
        "--pass-interval", "0,0.005", "--tuned-gc", "--dir", str(tmp_path), "--json",
    )  # fmt: skip
    table, _, raw = printed.partition("\n[")
    assert "dynaprompt sleepers: 20 conversations asleep" in table
    assert "p50 ms" in table
    assert "raw sqlite3 commits per second (bench_core's yardstick)" in table
    assert "memory while they sleep" in table
    assert "due at once, one run_due()" in table
    runs = json.loads("[" + raw)
    timed = [run for run in runs if not run["trace"] and not run["burst"] and run["n"] == 20]
    # One serve run per pass interval asked for, one served by two processes at once, then one with the collector
    # tuned (the runner's default interval).
    assert [(run["pass_interval_ms"], run["gc"], run["processes"]) for run in timed] == [
        (0, "default", 1), (5, "default", 1), (5, "default", 2), (5, "tuned", 1),
    ]  # fmt: skip
    [shared] = [run for run in timed if run["processes"] == 2]
    assert shared["duplicates"] == 0  # each sleeper handed over by one of the two
    assert "  2   64" in table
    [burst] = [run for run in runs if run["burst"]]
    assert burst["woken"] == 20
    for run in timed:
        assert "error" not in run
        assert run["woken"] == 20
        assert run["early"] == 0  # no sleeper was woken before the instant it asked for
        assert set(run["late_ms"]) >= {"p50", "p99", "max"}
    traced = [run for run in runs if run["trace"]]
    assert sorted(run["n"] for run in traced) == [0, 20]
    assert all("traced_mb" in run and "rss_mb" in run for run in traced)
    assert list(tmp_path.iterdir()) == []  # the benchmark's stores are removed
