"""The core benchmark still runs end to end (tiny sizes, so it cannot rot); its figures are not judged here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dynaprompt

from .conftest import run_benchmark

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_core.py"
TINY = ["--n", "4", "--k", "2", "--full-n", "2", "--live", "3", "--idle", "30", "--log-sizes", "40,80"]
TINY += ["--repeats", "1", "--raw-seconds", "0.05"]


@pytest.mark.slow
def test_benchmark_prints_every_figure_for_both_stores(tmp_path: Path) -> None:
    table, _, raw = run_benchmark(SCRIPT, *TINY, "--dir", str(tmp_path), "--json").partition("\n{")
    for label in (
        "turns per second",
        "turns per CPU-second",
        "synchronous=FULL",
        "raw sqlite3 commits per second (NORMAL)",
        "turns/s / raw commits/s (NORMAL)",
        "commits per turn",
        "live again after restart (3 conversations, s)",
        "cold resume, 40-event log (ms)",
        "cold resume, 80-event log (ms)",
        "CPU yardstick: a 1,000,000-iteration Python loop (ms)",
        "cold resume, 80-event log / that loop",
        "peak RSS",
        "heap per idle conversation, cache off",
        "kill: yes, power loss: no",
        "kill: yes, power loss: yes",
    ):
        assert label in table, f"{label!r} missing from:\n{table}"
    # The header names the dynaprompt the legs imported (this test's own), so a run cannot measure another
    # tree unnoticed.
    assert f" from {Path(dynaprompt.__file__).resolve().parent.parent}" in table.splitlines()[1]
    figures = json.loads("{" + raw)
    assert set(figures) == {"raw", "memory", "sqlite", "sqlite-full"}
    for kind in ("memory", "sqlite"):
        assert figures[kind]["turns"] == 4 * 2
        assert figures[kind]["turns_per_s"] > 0
        assert figures[kind]["commits_per_turn"] >= 1  # every turn writes durably
        assert set(figures[kind]["cold_resume_s"]) == {"40", "80"}
        assert figures[kind]["python_loop_s"] > 0
        # The ratio is the largest log's resume over the loop timed beside it (one repeat here: exactly that).
        ratio = figures[kind]["cold_resume_s"]["80"] / figures[kind]["python_loop_s"]
        assert figures[kind]["cold_resume_per_loop"] == pytest.approx(ratio)
    assert figures["sqlite"]["restart_live"] == 3
    assert figures["raw"]["normal"] > 0


@pytest.mark.slow
def test_cold_resume_benchmark_prints_its_stages_and_compares_trees(tmp_path: Path) -> None:
    script = SCRIPT.parent / "bench_cold.py"
    tiny = ["--events", "60", "--repeats", "1", "--dir", str(tmp_path)]
    figures = json.loads(run_benchmark(script, *tiny, "--json"))
    assert set(figures) == {"sqlite", "memory://"}
    for stage in ("cold deliver", "cold deliver cpu", "  validation", "  replay (Execution.extend + advance)"):
        assert figures["sqlite"][stage] > 0
    for store in ("sqlite", "memory://"):  # the CPU yardstick beside each store's resumes, and the ratio
        loop = figures[store]["CPU yardstick: 1,000,000-iteration loop"]
        assert figures[store]["cold deliver / that loop"] == pytest.approx(figures[store]["cold deliver"] / loop)
    # --ab against this very tree: one interleaved round each, printed side by side.
    same_tree = ["--ab", str(SCRIPT.parent.parent), "--rounds", "1"]
    assert "sqlite cold deliver" in run_benchmark(script, *tiny[:4], *same_tree)
