"""Benchmark of the MongoDB store: turns per second with 1 and 3 runner processes, cold resume as the log
grows, and the driver's raw ``insert_one`` rate on the same server as the yardstick.

Run ``python benchmarks/bench_mongo.py`` (``--help`` lists the options). It starts a SecantusDB server in a
temporary folder (``--uri mongodb://...`` or ``DYNAPROMPT_BENCH_MONGODB_URI`` use yours instead) and prints:

* the raw rate: sequential ``insert_one`` calls of an event-sized document into a collection with the
  events' unique index, one client, awaited one by one (as the runner awaits its writes);
* writes per turn, counted by wrapping the store's collections (every driver write call), and reads too;
* turns/s for N conversations x K turns, in 1 runner process and in 3 (each delivering to its third of
  the conversations, all at once after a common start signal; wall time from the signal to the last);
* the ratio turns/s / (raw insert_one rate / writes per turn), against the target 0.7, and a second
  yardstick: the very driver writes of a turn (same documents, same filters) issued raw, without the
  runner or the store, which shows how much of a turn is the writes themselves;
* cold resume: a new store and runner deliver one reply to a conversation whose log holds 100, 1,000
  and 10,000 events (loaded, validated and replayed; the logs are the documents a real run writes).

A *turn* is one ``runner.deliver()`` of the ``chat`` dialog: the reply is recorded, the bot acknowledges
it and asks the next question (two sends), both are handed to the channel and marked delivered.

This file reads the wall clock (``time.perf_counter``) on purpose: it measures the library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient, ReturnDocument, WriteConcern

from dynaprompt import Message, Runner, open_store
from dynaprompt.stores.memory import MemoryStore
from dynaprompt.stores.mongo import MongoStore

WRITE_METHODS = ("insert_one", "insert_many", "update_one", "find_one_and_update", "delete_one")
READ_METHODS = ("find_one", "find", "count_documents")


# The same workload as bench_core.py, so the two stores' turns are the same turn.
from bench_core import chat  # noqa: E402  (benchmarks/ is the script's folder, first on sys.path)


class NullChannel:
    async def deliver(self, message: Message) -> None:
        return None


class CountedCollection:
    """A real collection whose calls are counted by kind (writes and reads)."""

    def __init__(self, collection: Any, counts: dict[str, int]) -> None:
        self._collection = collection
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._collection, name)
        if name in WRITE_METHODS or name in READ_METHODS:
            key = f"{self._collection.name}.{name}"

            def counted(*args: Any, **kwargs: Any) -> Any:
                self._counts[key] = self._counts.get(key, 0) + 1
                return attribute(*args, **kwargs)

            return counted
        return attribute


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


# -- child processes: one runner each ---------------------------------------------------------------------------


async def child(url: str, prefix: str, n: int, k: int) -> None:
    """Start n conversations, say READY, wait for GO on stdin, deliver k rounds of replies, print the result."""
    store = await open_store(url)
    conversations = ids(prefix, n)
    async with Runner(store, NullChannel()) as runner:
        for cid in conversations:
            await runner.start(chat, cid)
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        began = time.perf_counter()
        for turn in range(k):
            for cid in conversations:
                await runner.deliver(cid, f"answer {turn}")
        took = time.perf_counter() - began
    await store.close()
    print(json.dumps({"turns": n * k, "seconds": took}), flush=True)


def run_runners(url: str, processes: int, n: int, k: int) -> dict[str, float]:
    """``processes`` runner processes on one database, each on n // processes conversations of its own."""
    share = n // processes
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", url, f"p{index}-", str(share), str(k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for index in range(processes)
    ]
    for process in children:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "READY", "a runner process failed to start"
    began = time.perf_counter()
    for process in children:
        assert process.stdin is not None
        process.stdin.write("GO\n")
        process.stdin.flush()
    results = []
    for process in children:
        out, _ = process.communicate(timeout=600)
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - began
    turns = sum(result["turns"] for result in results)
    return {"turns": turns, "seconds": wall, "turns_per_s": turns / wall}


# -- measurements in the parent -----------------------------------------------------------------------------------


async def raw_insert_rate(uri: str, count: int) -> float:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    collection = client["bench_raw"]["events"]
    await collection.drop()
    await collection.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
    body = {"kind": "sent", "at": "2026-01-05T09:00:00Z", "text": "Got 'answer 1'.", "to": None, "metadata": {}}
    for seq in range(1, 51):  # warm the connection pool and the server
        await collection.insert_one({"conversation_id": "warm", "seq": seq, **body})
    began = time.perf_counter()
    for seq in range(1, count + 1):
        await collection.insert_one({"conversation_id": "raw", "seq": seq, **body})
    took = time.perf_counter() - began
    await client.close()
    return count / took


async def raw_turn_rate(uri: str, turns: int) -> float:
    """The driver calls of one turn, with the documents a turn writes and nothing else (no runner, no store):
    take the lease, insert the reply and the bot's events, update the row, insert the delivered marks, update
    the row dropping the lease. Sequential, one client, journaled as the store writes."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    database = client["bench_raw_turn"]
    concern = WriteConcern(j=True)
    events = database.get_collection("events", write_concern=concern)
    rows = database.get_collection("conversations", write_concern=concern)
    await events.drop()
    await rows.drop()
    await events.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
    await rows.insert_one({"_id": "raw", "state": "waiting_for_reply", "last_seq": 0, "lease_owner": None})
    at = "2026-01-05T09:00:00Z"
    began = time.perf_counter()
    for turn in range(turns):
        seq = turn * 6
        await rows.find_one_and_update(
            {"_id": "raw", "$or": [{"lease_until": None}, {"lease_owner": "me"}]},
            {"$set": {"lease_owner": "me", "lease_until": 1}}, return_document=ReturnDocument.AFTER,
        )  # fmt: skip
        base = {"conversation_id": "raw", "at": at}
        sent = {**base, "kind": "sent", "to": None, "metadata": {}, "due_at": None}
        await events.insert_many(
            [
                {**base, "seq": seq + 1, "kind": "reply", "text": f"answer {turn}", "metadata": {}},
                {**sent, "seq": seq + 2, "text": "Got it."},
                {**sent, "seq": seq + 3, "text": "Question?"},
                {**base, "seq": seq + 4, "kind": "waiting", "timeout_at": None},
            ],
            ordered=True,
        )
        await rows.find_one_and_update(
            {"_id": "raw", "last_seq": {"$lte": seq + 4}},
            {"$set": {"state": "waiting_for_reply", "needs_advance": False}, "$max": {"last_seq": seq + 4}},
            return_document=ReturnDocument.AFTER,
        )
        await events.insert_many(
            [{"conversation_id": "raw", "seq": seq + n, "kind": "delivered", "at": at, "message_id": f"raw:{seq + n}"}
             for n in (5, 6)],
            ordered=True,
        )  # fmt: skip
        await rows.find_one_and_update(
            {"_id": "raw", "last_seq": {"$lte": seq + 6}, "lease_owner": "me"},
            {"$set": {"needs_advance": False, "lease_owner": None, "lease_until": None}, "$max": {"last_seq": seq + 6}},
            return_document=ReturnDocument.AFTER,
        )
    took = time.perf_counter() - began
    await client.close()
    return turns / took


async def count_operations(url: str, n: int, k: int) -> tuple[dict[str, float], dict[str, float]]:
    """Driver writes and reads per turn, by kind, on a run of n x k turns."""
    store = await open_store(url)
    assert isinstance(store, MongoStore)
    counts: dict[str, int] = {}
    store._events = CountedCollection(store._events, counts)  # type: ignore[assignment]
    store._rows = CountedCollection(store._rows, counts)  # type: ignore[assignment]
    async with Runner(store, NullChannel()) as runner:
        for cid in ids("count", n):
            await runner.start(chat, cid)
        counts.clear()
        for turn in range(k):
            for cid in ids("count", n):
                await runner.deliver(cid, f"answer {turn}")
    await store.close()
    turns = n * k
    writes = {key: value / turns for key, value in counts.items() if key.rpartition(".")[2] in WRITE_METHODS}
    reads = {key: value / turns for key, value in counts.items() if key.rpartition(".")[2] in READ_METHODS}
    return writes, reads


async def cold_resume(url: str, sizes: list[int], repeats: int) -> dict[int, float]:
    """Seconds for a new store and runner to deliver one reply to a conversation with a log of each size."""
    results: dict[int, float] = {}
    for size in sizes:
        turns = max((size - 4) // 6, 0)
        # The log a real run writes, made in memory (fast), then stored as the MongoDB store stores it.
        memory = MemoryStore()
        async with Runner(memory, NullChannel(), cache_size=0) as runner:
            await runner.start(chat, "long")
            for turn in range(turns):
                await runner.deliver("long", f"answer {turn}")
        events = await memory.load("long")
        row = await memory.get("long")
        assert row is not None
        timings = []
        for attempt in range(repeats):
            store = await open_store(url)
            assert isinstance(store, MongoStore)
            cid = f"long-{size}-{attempt}"
            docs = [{"conversation_id": cid, **event.model_dump(mode="json")} for event in events]
            for start in range(0, len(docs), 1000):
                await store.database["events"].insert_many(docs[start : start + 1000])
            from dynaprompt.stores.mongo import _row_doc

            await store.database["conversations"].insert_one(_row_doc(row.model_copy(update={"id": cid}), len(docs)))
            await store.close()
            began = time.perf_counter()
            store = await open_store(url)  # as a freshly started process would: new client, empty cache
            async with Runner(store, NullChannel()) as runner:
                status = await runner.deliver(cid, "back again")
            took = time.perf_counter() - began
            await store.close()
            assert status.state == "waiting_for_reply", status
            timings.append(took)
        results[len(events)] = statistics.median(timings)
    return results


# -- the server ---------------------------------------------------------------------------------------------------


def start_secantus(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    log_path = folder / "secantus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", "0",
             "--storage-path", str(folder / "data"), "--log-level", "INFO"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on [^:\s]+:(\d+)", log_path.read_text(errors="replace"))
        if found:
            return process, f"mongodb://127.0.0.1:{found.group(1)}"
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("SecantusDB did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--uri", default=os.environ.get("DYNAPROMPT_BENCH_MONGODB_URI"), help="a server to use")
    parser.add_argument("--n", type=int, default=60, help="conversations (divisible by 3)")
    parser.add_argument("--k", type=int, default=10, help="turns per conversation")
    parser.add_argument("--raw", type=int, default=3000, help="insert_one calls for the yardstick")
    parser.add_argument("--log-sizes", default="100,1000,10000", help="event counts for cold resume")
    parser.add_argument("--repeats", type=int, default=3, help="cold resumes per size (median)")
    parser.add_argument("--child", nargs=4, metavar=("URL", "PREFIX", "N", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, prefix, n, k = args.child
        asyncio.run(child(url, prefix, int(n), int(k)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-mongo-") as folder:
        server = None
        uri = args.uri
        if uri is None:
            server, uri = start_secantus(Path(folder))
        uri = uri.rstrip("/")
        try:
            run = f"bench_{os.getpid()}"
            raw = asyncio.run(raw_insert_rate(uri, args.raw))
            raw_turns = asyncio.run(raw_turn_rate(uri, max(args.raw // 5, 100)))
            writes, reads = asyncio.run(count_operations(f"{uri}/{run}_count", 12, 5))
            one = run_runners(f"{uri}/{run}_one", 1, args.n, args.k)
            three = run_runners(f"{uri}/{run}_three", 3, args.n, args.k)
            sizes = [int(size) for size in args.log_sizes.split(",")]
            resume = asyncio.run(cold_resume(f"{uri}/{run}_resume", sizes, args.repeats))
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)

    per_turn = sum(writes.values())
    budget = raw / per_turn
    print(f"MongoDB store benchmark: {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, server {'SecantusDB (child process)' if args.uri is None else 'given'}")  # fmt: skip
    print(f"raw insert_one (sequential, one client)      {raw:9.0f} /s")
    print(f"driver writes per turn                       {per_turn:9.2f}   "
          + ", ".join(f"{key} {value:.2f}" for key, value in sorted(writes.items())))  # fmt: skip
    print(f"driver reads per turn                        {sum(reads.values()):9.2f}   "
          + ", ".join(f"{key} {value:.2f}" for key, value in sorted(reads.items())))  # fmt: skip
    print(f"write budget: raw rate / writes per turn     {budget:9.1f} turns/s")
    print(f"a turn's 5 driver writes alone, raw          {raw_turns:9.1f} turns/s   "
          f"(= {raw / raw_turns:.1f} insert_one calls' time)")  # fmt: skip
    for label, result in (("1 runner process", one), ("3 runner processes", three)):
        ratio = result["turns_per_s"] / budget
        verdict = "meets" if ratio >= 0.7 else "misses"
        print(f"turns/s, {args.n} conv x {args.k} turns, {label:19s}{result['turns_per_s']:9.1f}   "
              f"ratio {ratio:.2f} ({verdict} the 0.7 target); "
              f"{result['turns_per_s'] / raw_turns:.2f} of the raw turn writes")  # fmt: skip
    for events, seconds in resume.items():
        print(f"cold resume, log of {events:6d} events           {seconds * 1000:9.1f} ms")
    print(json.dumps({
        "raw_insert_one_per_s": raw, "raw_turn_writes_per_s": raw_turns,
        "writes_per_turn": writes, "reads_per_turn": reads,
        "turns_per_s_1": one["turns_per_s"], "turns_per_s_3": three["turns_per_s"],
        "ratio_1": one["turns_per_s"] / budget, "ratio_3": three["turns_per_s"] / budget,
        "cold_resume_s": resume,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
