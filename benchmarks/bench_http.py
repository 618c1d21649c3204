"""Benchmark of ``POST /conversations/{id}/messages``: one guessbot turn over HTTP, next to the same turn in-process.

Run ``python benchmarks/bench_http.py`` (``--help`` lists the knobs). In one run it measures, on SQLite:

* **in-process**: ``runner.deliver()`` called directly, by ``--concurrency`` tasks, one conversation each;
* **over HTTP**: ``dynaprompt serve examples/guessbot.py`` started as a real process on 127.0.0.1, driven by
  an httpx async client with ``--concurrency`` connections, one conversation each.

A *turn* is one guess in a game of ``examples/guessbot.py`` (binary search; a won game answers "yes" to
another one): the reply is made durable, the bot answers ("Higher than 50."), and it waits again. Each
mode runs until ``--turns`` turns or ``--seconds`` seconds, whichever comes first, after ``--warmup``
turns per conversation that are not counted. Figures: turns per second and latency percentiles of
single turns.

This file reads the wall clock (``time.perf_counter``) on purpose: it measures the library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from dynaprompt import ListChannel, Runner, open_store
from dynaprompt.loading import load_dialog

ROOT = Path(__file__).resolve().parent.parent
GUESSBOT = str(ROOT / "examples" / "guessbot.py")


class Player:
    """Plays guessbot by binary search on the bot's answers; ``next_text`` is what to send next."""

    def __init__(self) -> None:
        self.low, self.high = 1, 100
        self.next_text = "50"

    def heard(self, answers: list[str]) -> None:
        first = answers[0] if answers else ""
        guess = int(self.next_text) if self.next_text.isdigit() else 0
        if first.startswith("Higher"):
            self.low = guess + 1
        elif first.startswith("Lower"):
            self.high = guess - 1
        elif first.startswith("Yes,") or first.startswith("Another game"):
            self.next_text = "yes"
            return
        elif first.startswith("I'm thinking"):
            self.low, self.high = 1, 100
        self.next_text = str((self.low + self.high) // 2)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(
    players: int, turn: Callable[[int, Player], Awaitable[None]], warmup: int, turns: int, seconds: float
) -> dict[str, Any]:
    """Run ``players`` concurrent loops of ``turn`` until ``turns`` or ``seconds``; latency of each counted turn."""
    latencies: list[float] = []
    state = [Player() for _ in range(players)]
    for number, player in enumerate(state):
        for _ in range(warmup):
            await turn(number, player)
    started = time.perf_counter()
    deadline = started + seconds

    async def loop(number: int) -> None:
        while len(latencies) < turns and time.perf_counter() < deadline:
            before = time.perf_counter()
            await turn(number, state[number])
            latencies.append(time.perf_counter() - before)

    await asyncio.gather(*(loop(number) for number in range(players)))
    elapsed = time.perf_counter() - started
    return {
        "turns": len(latencies),
        "seconds": round(elapsed, 3),
        "turns_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


async def in_process(db: Path, args: argparse.Namespace) -> dict[str, Any]:
    guessbot = load_dialog(GUESSBOT)
    store = await open_store(f"sqlite:///{db}")
    channel = ListChannel()
    try:
        async with Runner(store, channel) as runner:
            for number in range(args.concurrency):
                await runner.start(guessbot, f"p{number}")

            async def turn(number: int, player: Player) -> None:
                before = len(channel.messages)
                await runner.deliver(f"p{number}", player.next_text)
                player.heard([m.text for m in channel.messages[before:] if m.conversation_id == f"p{number}"])
                del channel.messages[:]  # keep memory flat

            return await drive(args.concurrency, turn, args.warmup, args.turns, args.seconds)
    finally:
        await store.close()


def start_service(db: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "dynaprompt.cli", "serve", GUESSBOT, "--store", f"sqlite:///{db}", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    found = re.search(r"on (http://\S+)", process.stdout.readline() if ready else "")
    if found is None:
        process.kill()
        raise SystemExit("the service did not start")
    return process, found.group(1)


async def over_http(db: Path, args: argparse.Namespace) -> dict[str, Any]:
    process, url = start_service(db)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    try:
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            for number in range(args.concurrency):
                response = await client.post(
                    "/conversations", json={"dialog": "guessbot", "conversation_id": f"h{number}"}
                )
                response.raise_for_status()

            async def turn(number: int, player: Player) -> None:
                response = await client.post(f"/conversations/h{number}/messages", json={"text": player.next_text})
                response.raise_for_status()
                player.heard([message["text"] for message in response.json()["messages"]])

            return await drive(args.concurrency, turn, args.warmup, args.turns, args.seconds)
    finally:
        process.terminate()
        process.wait(15)
        assert process.stdout is not None
        process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent conversations/connections (8)")
    parser.add_argument("--turns", type=int, default=2000, help="counted turns per mode at most (2000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per mode at most (20)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted turns per conversation first (3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {
            "in-process": asyncio.run(in_process(Path(folder) / "inprocess.db", args)),
            "over HTTP": asyncio.run(over_http(Path(folder) / "http.db", args)),
        }
    python = f"{platform.python_implementation()} {platform.python_version()}"
    machine = f"{python}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    if args.json:
        print(json.dumps({"machine": machine, "concurrency": args.concurrency, "results": results}, indent=2))
        return
    print(f"guessbot turn on SQLite, {args.concurrency} concurrent conversations; {machine}")
    print(f"{'mode':<12}{'turns':>8}{'turns/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for mode, figures in results.items():
        print(
            f"{mode:<12}{figures['turns']:>8}{figures['turns_per_second']:>10}{figures['p50_ms']:>10}"
            f"{figures['p99_ms']:>10}{figures['max_ms']:>10}"
        )


if __name__ == "__main__":
    main()
