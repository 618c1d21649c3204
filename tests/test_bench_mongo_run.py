"""The MongoDB benchmark still runs end to end (tiny sizes, against the session's server, with itself as the
baseline), so it cannot rot; its figures are not judged here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_benchmark

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_mongo.py"
TINY = ["--n", "3", "--k", "2", "--raw", "6", "--raw-turns", "2", "--rounds", "1", "--log-sizes", "40"]
TINY += ["--repeats", "1", "--count-n", "2", "--count-k", "2", "--passes", "1"]


@pytest.mark.slow
def test_mongo_benchmark_prints_every_figure(mongodb_uri: str) -> None:
    printed = run_benchmark(SCRIPT, *TINY, "--uri", mongodb_uri, "--baseline", str(ROOT), timeout=600)
    table, _, raw = printed.partition("\n{")
    for label in (
        "what a write costs",
        "insert_one j=true (store's)",
        "find_one_and_update, j=true",
        "(leaner) insert_many of 4, j=true, _id as key",
        "(leaner) update_one, no secondary index",
        "driver writes per turn 4.00",
        "with a row update between the inserts",
        "the runner and the store add",
        "concurrent, 3 tasks, 3 processes",
        "sequential, 3 proc (baseline)",
        "3 tasks, 1 proc",
        "cold resume, log of",
        "in CPU time, j=true",
        "the 4 writes of a turn issued raw against other layouts",
        "events keyed by _id, only wake_at indexed",
    ):
        assert label in table, f"{label!r} missing from:\n{table}"
    figures = json.loads("{" + raw)
    for tag in ("base", "this"):
        for run in ("seq1", "seq3", "conc1", "conc3"):
            assert figures[f"{tag}_{run}"]["count"] == 3 * 2
            assert figures[f"{tag}_{run}"]["ratio_j"] > 0
    assert set(figures["layouts"]) >= {"the store's", "events keyed by _id, only wake_at indexed"}
    assert all(layout["ratio"] > 0 for layout in figures["layouts"].values())
    assert sum(figures["count_this"]["writes"].values()) >= 2  # every turn writes (events, then the row)
