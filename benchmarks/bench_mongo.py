"""Benchmark of the MongoDB store: what each kind of write costs on the server, turns per second with 1 and 3
runner processes (sequential and concurrent), cold resume as the log grows, and the driver's raw ``insert_one``
rate on the same server, in the same run, as the yardstick.

Run ``python benchmarks/bench_mongo.py`` (``--help`` lists the options). It starts a SecantusDB server in a
temporary folder (``--uri mongodb://...`` or ``DYNAPROMPT_BENCH_MONGODB_URI`` use yours instead) and prints:

* the cost of each kind of driver write on this server (sequential, one client, interleaved rounds), in
  milliseconds, in ``insert_one`` calls' time, in client CPU and in server CPU: ``insert_one`` with the driver's default
  write concern (the yardstick the issue names) and with the store's (``j=true``), ``insert_many`` of 4 and of
  2 event documents, ``update_one`` and ``find_one_and_update`` of a conversation document;
* writes (and reads) per turn, counted by wrapping the store's collections (every driver call), and in that
  run (sequential, one process) the time a turn spends awaiting those writes: the rest is what the runner and
  the store add;
* turns/s for N conversations x K turns, in 1 runner process and in 3 (each on its third of the
  conversations, all at once after a common start signal; wall time from the signal to the last), driven
  *sequentially* (one ``deliver()`` at a time per process) and *concurrently* (``--concurrency`` tasks in all,
  split over the processes, each delivering the K replies of one conversation after another, as a server
  with many users does), with each process's CPU time per turn and the server's (when this script started
  the server: read from ``/proc``);
* the yardstick in the same layout, run just before those turns: raw ``insert_one`` calls of an event-sized
  document, one at a time per process, or with the same number of tasks in the same number of processes;
* the ratio turns/s / (raw insert_one rate / writes per turn), against the target 0.7, for both write
  concerns, and the same ratio in CPU time (server + client), which the machine's load moves far less; all
  of it ``--passes`` times (medians printed with their min-max: wall rates vary a lot on a shared machine);
  on a SecantusDB of its own, with the driver's retryable writes off (see ``OPTIONS``); and a second
  yardstick: a turn's very driver writes issued raw
  (same documents, same filters, no runner, no store), which shows what the runner and the store add to the
  writes themselves;
* cold resume: a new store and runner deliver one reply to a conversation whose log holds 100, 1,000
  and 10,000 events (loaded, validated and replayed; the logs are the documents a real run writes).

``--baseline PATH`` also runs every turn measurement with the ``dynaprompt`` package of another checkout (its
runner processes get ``PYTHONPATH=PATH``), interleaved with this one's against the same server: a before/after
comparison in one run.

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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient, ReturnDocument, WriteConcern

from dynaprompt import Message, Runner, open_store
from dynaprompt.stores.memory import MemoryStore
from dynaprompt.stores.mongo import MongoStore

WRITE_METHODS = ("insert_one", "insert_many", "update_one", "find_one_and_update", "delete_one")
READ_METHODS = ("find_one", "find", "count_documents")
AT = "2026-01-05T09:00:00Z"
SENT = {"kind": "sent", "at": AT, "text": "Got 'answer 1'.", "to": None, "metadata": {}, "due_at": None}

# The same workload as bench_core.py, so the two stores' turns are the same turn.
from bench_core import chat, code_under_test, run_turns, run_turns_concurrently  # noqa: E402  (benchmarks/ is first on sys.path)


class NullChannel:
    async def deliver(self, message: Message) -> None:
        return None


class CountedCollection:
    """A real collection whose calls are counted by kind (writes and reads), and the wall time spent awaiting
    the writes summed (the driver and the server; the rest of a turn is the runner and the store)."""

    def __init__(self, collection: Any, counts: dict[str, int], waited: list[float]) -> None:
        self._collection = collection
        self._counts = counts
        self._waited = waited

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._collection, name)
        if name in WRITE_METHODS:
            key = f"{self._collection.name}.{name}"

            async def timed(*args: Any, **kwargs: Any) -> Any:
                self._counts[key] = self._counts.get(key, 0) + 1
                began = time.perf_counter()
                try:
                    return await attribute(*args, **kwargs)
                finally:
                    self._waited[0] += time.perf_counter() - began

            return timed
        if name in READ_METHODS:
            key = f"{self._collection.name}.{name}"

            def counted(*args: Any, **kwargs: Any) -> Any:
                self._counts[key] = self._counts.get(key, 0) + 1
                return attribute(*args, **kwargs)

            return counted
        return attribute


SERVER_PID: int | None = None  # the SecantusDB process this script started (its CPU time is read from /proc)
# URL options of every client (the store's, the yardstick's). With a SecantusDB of its own the script turns the
# driver's retryable writes off: SecantusDB keeps each one's reply for 30 minutes, up to 10,000, and scans (past
# 10,000: sorts) them all on every write, so its CPU per write grew from 1.5 to 20 ms over a run, and whatever
# ran later in a run ran slower. mongod keeps them in a session table: no such cost.
OPTIONS = ""


def server_cpu() -> float | None:
    """CPU seconds (user + system) the server process has used so far, if this script started it (Linux)."""
    if SERVER_PID is None:
        return None
    try:
        fields = Path(f"/proc/{SERVER_PID}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


# -- child processes: one runner (or one raw writer) each -------------------------------------------------------


async def child_turns(url: str, prefix: str, n: int, k: int, tasks: int) -> dict[str, Any]:
    """Start n conversations, say READY, wait for GO on stdin, deliver k replies to each (one at a time when
    ``tasks`` is 0, else with that many tasks at once), and say how long it took."""
    store = await open_store(url)
    conversations = ids(prefix, n)
    async with Runner(store, NullChannel()) as runner:
        for cid in conversations:
            await runner.start(chat, cid)
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        if tasks:
            took, cpu = await run_turns_concurrently(runner, conversations, k, tasks)
        else:
            took, cpu = await run_turns(runner, conversations, k)
    await store.close()
    return {"count": n * k, "seconds": took, "cpu": cpu}


async def child_raw(url: str, prefix: str, count: int, tasks: int, journal: bool) -> dict[str, Any]:
    """``count`` raw ``insert_one`` calls of an event-sized document (``tasks`` at once), after READY/GO."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    collection = client.get_default_database().get_collection(
        "events", write_concern=WriteConcern(j=True) if journal else None
    )
    await collection.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
    for seq in range(1, 21):  # warm the connection pool and the server
        await collection.insert_one({**SENT, "conversation_id": f"{prefix}warm", "seq": seq})
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    numbers = iter(range(count))

    async def worker(task: int) -> None:
        for seq in numbers:
            await collection.insert_one({**SENT, "conversation_id": f"{prefix}{task}", "seq": seq})

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(task) for task in range(max(tasks, 1))))
    took, cpu = time.perf_counter() - began, time.process_time() - cpu
    await client.close()
    return {"count": count, "seconds": took, "cpu": cpu}


async def child_count(url: str, n: int, k: int) -> dict[str, Any]:
    """Driver writes and reads per turn, by kind, on a run of n x k turns (sequential)."""
    store = await open_store(url)
    assert isinstance(store, MongoStore)
    counts: dict[str, int] = {}
    waited = [0.0]
    # _rows_unjournaled (the claim and the last row write of a turn) was _claims before 3 (a baseline's name)
    for attribute in ("_events", "_rows", "_rows_unjournaled", "_claims"):
        if hasattr(store, attribute):
            setattr(store, attribute, CountedCollection(getattr(store, attribute), counts, waited))
    async with Runner(store, NullChannel()) as runner:
        for cid in ids("count", n):
            await runner.start(chat, cid)
        counts.clear()
        waited[0] = 0.0
        began = time.perf_counter()
        for turn in range(k):
            for cid in ids("count", n):
                await runner.deliver(cid, f"answer {turn}")
        took = time.perf_counter() - began
    await store.close()
    turns = n * k
    return {
        "turn_ms": 1000 * took / turns,
        "writes_ms": 1000 * waited[0] / turns,
        "writes": {key: value / turns for key, value in counts.items() if key.rpartition(".")[2] in WRITE_METHODS},
        "reads": {key: value / turns for key, value in counts.items() if key.rpartition(".")[2] in READ_METHODS},
    }


def spawn(args: list[str], pythonpath: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def run_children(commands: list[list[str]], pythonpath: str | None = None) -> dict[str, float]:
    """One child per command, released together once all are READY; wall time from GO to the last one done,
    the summed count (turns or inserts), and the children's CPU seconds per item."""
    children = [spawn(command, pythonpath) for command in commands]
    for process in children:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "READY", "a benchmark process failed to start"
    began, server_began = time.perf_counter(), server_cpu()
    for process in children:
        assert process.stdin is not None
        process.stdin.write("GO\n")
        process.stdin.flush()
    results = []
    for process in children:
        out, _ = process.communicate(timeout=1200)
        assert process.returncode == 0, "a benchmark process failed"
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - began
    server_ended = server_cpu()
    count = sum(result["count"] for result in results)
    figures = {
        "count": count,
        "seconds": wall,
        "per_s": count / wall,
        "cpu_ms": 1000 * sum(r["cpu"] for r in results) / count,
        "load": os.getloadavg()[0],
    }
    if server_began is not None and server_ended is not None:
        # Includes whatever else the server did meanwhile (nothing else uses it during a run); clock ticks: 10 ms.
        figures["server_cpu_ms"] = 1000 * (server_ended - server_began) / count
    return figures


def child_result(args: list[str], pythonpath: str | None = None) -> dict[str, Any]:
    process = spawn(args, pythonpath)
    out, _ = process.communicate(timeout=1200)
    assert process.returncode == 0, "a benchmark process failed"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def turns(url: str, processes: int, n: int, k: int, tasks: int, pythonpath: str | None) -> dict[str, float]:
    """``processes`` runner processes on one database, each on n // processes conversations of its own, with
    ``tasks`` // processes tasks each (0: sequential)."""
    return run_children(
        [["--child", "turns", url, f"p{index}-", str(n // processes), str(k), str(tasks // processes)]
         for index in range(processes)],
        pythonpath,
    )  # fmt: skip


def raw_inserts(url: str, processes: int, count: int, tasks: int, journal: bool) -> dict[str, float]:
    return run_children(
        [["--child", "raw", url, f"p{index}-", str(count // processes), str(tasks // processes), str(int(journal))]
         for index in range(processes)]
    )  # fmt: skip


# -- measurements in the parent -----------------------------------------------------------------------------------


Index = list[tuple[str, int]]
# The store's indexes on ``conversations`` (a row update maintains them too), and the sparse ones of the leaner
# layouts ``layout_ceilings`` measures.
ROW_INDEXES: list[Index] = [[("wake_at", 1)], [("needs_advance", 1), ("lease_until", 1)], [("lease_until", 1)]]
SPARSE_ROW_INDEXES: list[Index] = [[("wake_at", 1)], [("needs_advance", 1)], [("lease_until", 1)]]


async def row_indexes(rows: Any) -> None:
    """The store's indexes on ``conversations``."""
    for keys in ROW_INDEXES:
        await rows.create_index(keys)


async def write_costs(uri: str, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """Each kind of driver write a turn may use, timed in interleaved rounds on one client (sequential): wall
    milliseconds and client CPU milliseconds per call."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(f"{uri}/{OPTIONS}")
    database = client["bench_costs"]
    journaled = WriteConcern(j=True)
    plain = database.get_collection("plain")
    events = database.get_collection("events", write_concern=journaled)
    rows = database.get_collection("conversations", write_concern=journaled)
    plain_rows = database.get_collection("conversations")
    # Leaner layouts, for comparison only (the store does not use them): events whose _id is their key, with no
    # secondary index, and a conversation document with no secondary index.
    keyed = database.get_collection("events_keyed", write_concern=journaled)
    bare_rows = database.get_collection("conversations_bare")
    for collection in (plain, events, rows, keyed, bare_rows):
        await collection.drop()
    for collection in (plain, events):
        await collection.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
    await row_indexes(rows)
    await rows.insert_one({"_id": "c", "dialog": "bench_core:chat", "state": "waiting_for_reply", "wake_at": None,
                           "last_seq": 0, "run": 1, "run_seq": 1, "result": None, "error": None, "parked": False,
                           "needs_advance": False, "lease_owner": None, "lease_until": None, "updated_at": 0,
                           "tz": "UTC"})  # fmt: skip
    await bare_rows.insert_one({"_id": "c", "last_seq": 0, "lease_owner": None, "lease_until": None})
    counter = iter(range(1, 10**9))

    def keyed_events_of(size: int) -> list[dict[str, Any]]:
        return [{**event, "_id": f"c\x1f{event['seq']:012d}"} for event in events_of(size)]

    def events_of(size: int) -> list[dict[str, Any]]:
        return [{**SENT, "conversation_id": "c", "seq": next(counter)} for _ in range(size)]

    def row_filter() -> dict[str, Any]:
        return {"_id": "c", "$or": [{"lease_until": None}, {"lease_owner": "me"}, {"lease_until": {"$lte": 5}}]}

    kinds: dict[str, Callable[[], Awaitable[Any]]] = {
        "insert_one (driver default)": lambda: plain.insert_one({**SENT, "conversation_id": "c", "seq": next(counter)}),
        "insert_one j=true (store's)": lambda: events.insert_one(events_of(1)[0]),
        "insert_many of 4, j=true": lambda: events.insert_many(events_of(4), ordered=True),
        "insert_many of 2, j=true": lambda: events.insert_many(events_of(2), ordered=True),
        "update_one, j=true": lambda: rows.update_one(
            row_filter(), {"$set": {"lease_owner": "me", "n": next(counter)}}
        ),
        "update_one (driver default)": lambda: plain_rows.update_one(
            row_filter(), {"$set": {"lease_owner": "me", "n": next(counter)}}
        ),
        "find_one_and_update, j=true": lambda: rows.find_one_and_update(
            row_filter(), {"$set": {"lease_owner": "me", "n": next(counter)}}, return_document=ReturnDocument.AFTER
        ),
        "(leaner) insert_many of 4, j=true, _id as key": lambda: keyed.insert_many(keyed_events_of(4), ordered=True),
        "(leaner) update_one, no secondary index": lambda: bare_rows.update_one(
            {"_id": "c"}, {"$set": {"lease_owner": "me", "n": next(counter)}}
        ),
    }
    for call in kinds.values():  # warm the connection and the server
        for _ in range(10):
            await call()
    totals = {kind: [0.0, 0.0, 0.0] for kind in kinds}
    for _ in range(rounds):
        for kind, call in kinds.items():
            began, cpu, server = time.perf_counter(), time.process_time(), server_cpu() or 0.0
            for _ in range(per_round):
                await call()
            totals[kind][0] += time.perf_counter() - began
            totals[kind][1] += time.process_time() - cpu
            totals[kind][2] += (server_cpu() or 0.0) - server
    await client.close()
    calls = rounds * per_round
    return {
        kind: {"ms": 1000 * wall / calls, "cpu_ms": 1000 * cpu / calls, "server_cpu_ms": 1000 * server / calls}
        for kind, (wall, cpu, server) in totals.items()
    }


async def raw_turn_rate(uri: str, turns: int, *, middle_row_update: bool = False) -> dict[str, float]:
    """The driver calls of one warm turn as the store issues them, with the documents a turn writes and
    nothing else (no runner, no store): claim the lease (update_one, not journaled), insert the reply and the
    bot's events, insert the delivered marks, update the row dropping the lease (update_one). Sequential, one
    client, journaled as the store writes. ``middle_row_update=True`` adds the row update the store made
    between the two inserts until it put it off to the last write (5 writes, as before)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(f"{uri}/{OPTIONS}")
    turn = await _layout_turn(client["bench_raw_turn"], "", LAYOUTS["the store's"], middle_row_update=middle_row_update)
    began, cpu = time.perf_counter(), time.process_time()
    for _ in range(turns):
        await turn()
    took, cpu = time.perf_counter() - began, time.process_time() - cpu
    await client.close()
    return {"per_s": turns / took, "cpu_ms": 1000 * cpu / turns}


# The layouts the raw turn is issued against in ``layout_ceilings``: (events keyed by their ``_id``, the
# conversation document's indexes as (keys, sparse), writes journaled). Only the first is the store's.
_SPARSE = [(keys, True) for keys in SPARSE_ROW_INDEXES]
LAYOUTS: dict[str, tuple[bool, list[tuple[Index, bool]], bool]] = {
    "the store's": (False, [(keys, False) for keys in ROW_INDEXES], True),
    "sparse row indexes, lease unset": (False, _SPARSE, True),
    "  and events keyed by _id": (True, _SPARSE, True),
    "  and nothing journaled": (True, _SPARSE, False),
    "events keyed by _id, only wake_at indexed": (True, [([("wake_at", 1)], True)], True),
}
# A free row of the store's layout: its lease and flags are null and false, not left out.
NULLED_LEASE = {"lease_owner": None, "lease_until": None, "parked": False, "needs_advance": False}


async def layout_ceilings(uri: str, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """A warm turn's 4 writes issued raw (no runner, no store) against each of ``LAYOUTS``, in rounds
    interleaved with the yardstick's ``insert_one`` (driver default), one client, sequential: what each layout
    would let a store reach at best. Each layout's ratio is ``4 x insert_one time / turn time``, in wall time
    and in server CPU time. The sparse layouts leave a field out instead of setting it to null, so a claim and
    its release touch one sparse index entry each and an update that does not touch a field costs its index
    nothing; keyed events need no second unique index, but SecantusDB reads an ``_id`` range by a scan."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(f"{uri}/{OPTIONS}")
    database = client["bench_layouts"]
    yardstick = database["plain"]
    await yardstick.drop()
    await yardstick.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
    counter = iter(range(10**9))

    async def insert_one() -> None:
        await yardstick.insert_one({**SENT, "conversation_id": "c", "seq": next(counter)})

    calls: dict[str, Callable[[], Awaitable[None]]] = {"insert_one": insert_one}
    for number, (name, layout) in enumerate(LAYOUTS.items()):
        calls[name] = await _layout_turn(database, str(number), layout)
    for call in calls.values():  # warm the connection and the server
        for _ in range(5):
            await call()
    walls: dict[str, list[float]] = {name: [] for name in calls}
    servers: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times = per_round * 3 if name == "insert_one" else per_round  # cheaper calls: more of them a round
            began, server = time.perf_counter(), server_cpu() or 0.0
            for _ in range(times):
                await call()
            walls[name].append(1000 * (time.perf_counter() - began) / times)
            servers[name].append(1000 * ((server_cpu() or 0.0) - server) / times)
    await client.close()
    unit, unit_server = statistics.median(walls["insert_one"]), statistics.median(servers["insert_one"])
    results = {}
    for name in LAYOUTS:
        wall, server = statistics.median(walls[name]), statistics.median(servers[name])
        results[name] = {
            "ms": wall,
            "insert_ones": wall / unit,
            "server_cpu_ms": server,
            "ratio": 4 * unit / wall,
            "cpu_ratio": 4 * unit_server / server if server else float("nan"),
        }
    return results


async def _layout_turn(
    database: Any, suffix: str, layout: tuple[bool, list[tuple[Index, bool]], bool], *, middle_row_update: bool = False
) -> Callable[[], Awaitable[None]]:
    """Fresh collections ``events<suffix>`` and ``rows<suffix>`` laid out as ``layout`` (see ``LAYOUTS``), one
    free conversation row in them, and the raw warm turn that writes to them: claim, the reply and the bot's
    events, the delivered marks, the row dropping the lease; each write checked to have hit, as the store's are.
    ``middle_row_update=True`` adds the row update between the two inserts that the store made until it put it
    off to the last write (5 writes)."""
    keyed, indexes, journaled = layout
    concern = WriteConcern(j=True) if journaled else None
    events = database.get_collection(f"events{suffix}", write_concern=concern)
    rows = database.get_collection(f"rows{suffix}", write_concern=concern)
    await events.drop()
    await rows.drop()
    if not keyed:
        await events.create_index([("conversation_id", 1), ("seq", 1)], unique=True)
    for keys, sparse in indexes:
        await rows.create_index(keys, sparse=sparse)
    sparse_row = all(sparse for _, sparse in indexes)
    free = {} if sparse_row else NULLED_LEASE
    await rows.insert_one({"_id": "c", "state": "waiting_for_reply", "last_seq": 0, "run_seq": 1, **free})
    claims = database[f"rows{suffix}"]  # the claim goes without j, as the store's does
    seqs = iter(range(0, 10**9, 6))

    def keyed_by_id(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**doc, "_id": f"c\x1f{doc['seq']:012d}"} for doc in docs] if keyed else docs

    async def turn() -> None:
        seq = next(seqs)
        claimed = await claims.update_one(
            {"_id": "c", "last_seq": seq, "run_seq": 1, "parked": {"$ne": True}, "needs_advance": {"$ne": True},
             "lease_until": {"$not": {"$gt": 5}}},
            {"$set": {"lease_owner": "me", "lease_until": 10}},
        )  # fmt: skip
        assert claimed.modified_count == 1
        base = {"conversation_id": "c", "at": AT}
        await events.insert_many(keyed_by_id([
            {**base, "seq": seq + 1, "kind": "reply", "text": f"answer {seq}"},
            {**SENT, **base, "seq": seq + 2, "text": "Got it."},
            {**SENT, **base, "seq": seq + 3, "text": "Question?"},
            {**base, "seq": seq + 4, "kind": "waiting"},
        ]), ordered=True)  # fmt: skip
        row_seq = seq
        if middle_row_update:
            held = {"_id": "c", "last_seq": seq, "lease_owner": "me", "lease_until": 10}
            moved = await rows.update_one(held, {"$set": {"last_seq": seq + 4, "updated_at": seq}})
            assert moved.modified_count == 1
            row_seq = seq + 4
        await events.insert_many(
            keyed_by_id(
                [{**base, "seq": seq + n, "kind": "delivered", "message_id": f"c:{seq + n - 3}"} for n in (5, 6)]
            ),
            ordered=True,
        )
        state = {"state": "waiting_for_reply", "last_seq": seq + 6, "updated_at": seq}
        drop: dict[str, Any] = (
            {"$set": state, "$unset": {"lease_owner": "", "lease_until": ""}}
            if sparse_row
            else {"$set": {**state, "lease_owner": None, "lease_until": None}}
        )
        held = {"_id": "c", "last_seq": row_seq, "lease_owner": "me", "lease_until": 10}
        dropped = await rows.update_one(held, drop)
        assert dropped.modified_count == 1

    return turn


async def cold_resume(url: str, sizes: list[int], repeats: int) -> dict[int, float]:
    """Seconds for a new store and runner to deliver one reply to a conversation with a log of each size."""
    from dynaprompt.stores.mongo import _event_doc, _row_doc

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
            docs = [_event_doc(cid, event) for event in events]
            for start in range(0, len(docs), 1000):
                await store.database["events"].insert_many(docs[start : start + 1000])
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


def child_main(argv: list[str]) -> None:
    kind, url, *rest = argv
    if kind == "turns":
        prefix, n, k, tasks = rest
        result = asyncio.run(child_turns(url, prefix, int(n), int(k), int(tasks)))
    elif kind == "raw":
        prefix, count, tasks, journal = rest
        result = asyncio.run(child_raw(url, prefix, int(count), int(tasks), journal == "1"))
    else:
        n, k = rest
        result = asyncio.run(child_count(url, int(n), int(k)))
    print(json.dumps(result), flush=True)


def measure(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    run = f"bench_{os.getpid()}"
    tasks = args.concurrency or args.n
    variants: list[tuple[str, str | None]] = [("this tree", None)]
    if args.baseline:
        variants.insert(0, ("baseline", str(Path(args.baseline).resolve())))
    figures: dict[str, Any] = {"concurrency": tasks, "costs": asyncio.run(write_costs(uri, args.rounds, 40))}
    figures["raw_turn"] = asyncio.run(raw_turn_rate(uri, args.raw_turns))
    figures["raw_turn_5"] = asyncio.run(raw_turn_rate(uri, args.raw_turns, middle_row_update=True))
    figures["layouts"] = asyncio.run(layout_ceilings(uri, args.rounds, args.layout_turns))
    for _, path in variants:
        tag = "base" if path else "this"
        count = f"{uri}/{run}_{tag}_count{OPTIONS}"
        figures[f"count_{tag}"] = child_result(["--child", "count", count, str(args.count_n), str(args.count_k)], path)
    # Each pass runs, for each layout, the yardstick and then the turns of each variant (the variants' order
    # alternating from pass to pass), so that a ratio divides figures measured minutes apart at most: the
    # server's journal flushes vary a lot on a shared machine. Medians over the passes are printed.
    runs: dict[str, list[dict[str, float]]] = {}
    for number in range(args.passes):
        ordered = variants if number % 2 == 0 else variants[::-1]
        for mode, concurrency in (("seq", 0), ("conc", tasks)):
            for processes in (1, 3):
                layout = f"{mode}{processes}"
                yardstick = {}
                for journal in (False, True):
                    concern = "j" if journal else "default"
                    url = f"{uri}/{run}_raw_{layout}_{concern}_{number}{OPTIONS}"
                    yardstick[concern] = raw_inserts(url, processes, args.raw, concurrency, journal)
                    runs.setdefault(f"raw_{layout}_{concern}", []).append(yardstick[concern])
                for _, path in ordered:
                    tag = "base" if path else "this"
                    url = f"{uri}/{run}_{tag}_{layout}_{number}{OPTIONS}"
                    result = turns(url, processes, args.n, args.k, concurrency, path)
                    per_turn = sum(figures[f"count_{tag}"]["writes"].values())
                    for concern, raw in yardstick.items():
                        result[f"ratio_{concern}"] = result["per_s"] / (raw["per_s"] / per_turn)
                        if "server_cpu_ms" in result and "server_cpu_ms" in raw:
                            # The same ratio in CPU time (server + runner processes), which another program's
                            # load on the machine moves far less than it moves wall time.
                            turn_cpu = result["server_cpu_ms"] + result["cpu_ms"]
                            insert_cpu = raw["server_cpu_ms"] + raw["cpu_ms"]
                            result[f"cpu_ratio_{concern}"] = per_turn * insert_cpu / turn_cpu
                    runs.setdefault(f"{tag}_{layout}", []).append(result)
    for key, results in runs.items():
        figures[key] = {name: statistics.median(result[name] for result in results) for name in results[0]}
        figures[key]["each_per_s"] = [result["per_s"] for result in results]
        for name in ("ratio_j", "ratio_default", "cpu_ratio_j", "server_cpu_ms", "load"):
            if name in results[0]:
                figures[key][f"each_{name}"] = [result[name] for result in results]
    sizes = [int(size) for size in args.log_sizes.split(",")]
    figures["cold_resume_s"] = asyncio.run(cold_resume(f"{uri}/{run}_resume{OPTIONS}", sizes, args.repeats))
    return figures


def spread(values: list[float], form: str = ".2f") -> str:
    return f"{min(values):{form}}-{max(values):{form}}"


def report(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    costs = figures["costs"]
    unit = costs["insert_one (driver default)"]["ms"]
    tasks = figures["concurrency"]
    print(f"MongoDB store benchmark: {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, server {'SecantusDB (child process)' if args.uri is None else 'given'}, "
          f"driver's retryable writes {'on' if args.uri is not None or args.retry_writes else 'off'}")  # fmt: skip
    print(code_under_test())
    print("\nwhat a write costs (sequential, one client)   ms/call  insert_one calls   client CPU ms   server CPU ms"
          "   (server CPU: 0 when the server is not this script's)")  # fmt: skip
    for kind, cost in costs.items():
        print(f"  {kind:43s}{cost['ms']:7.2f}  {cost['ms'] / unit:10.2f}  {cost['cpu_ms']:17.2f}  "
              f"{cost['server_cpu_ms']:13.2f}")  # fmt: skip
    tags = ["base", "this"] if args.baseline else ["this"]
    for tag in tags:
        counted = figures[f"count_{tag}"]
        writes, reads = counted["writes"], counted["reads"]
        name = "baseline" if tag == "base" else "this tree"
        print(f"\n{name}: driver writes per turn {sum(writes.values()):.2f} ("
              + ", ".join(f"{key} {value:.2f}" for key, value in sorted(writes.items()))
              + f"); reads per turn {sum(reads.values()):.2f}")  # fmt: skip
        added = counted["turn_ms"] - counted["writes_ms"]
        print(f"  a sequential turn took {counted['turn_ms']:.1f} ms, of which {counted['writes_ms']:.1f} ms awaiting "
              f"the driver's writes: the runner and the store add {added:.1f} ms")  # fmt: skip
        if tag == "this":
            # the claim and the last row write go without j; the two inserts with it
            one_turn = (2 * costs["update_one (driver default)"]["ms"]
                        + costs["insert_many of 4, j=true"]["ms"]
                        + costs["insert_many of 2, j=true"]["ms"])  # fmt: skip
            print(f"  those writes at the costs above: {one_turn:.1f} ms = {one_turn / unit:.1f} insert_one calls")
            for key, what in (("raw_turn", "those 4"), ("raw_turn_5", "with a row update between the inserts (5)")):
                print(f"  {what}, issued raw in a loop (no runner, no store): {figures[key]['per_s']:.1f} turns/s, "
                      f"{figures[key]['cpu_ms']:.2f} ms client CPU a turn")  # fmt: skip
    print("\nthe 4 writes of a turn issued raw against other layouts (no runner, no store; interleaved with "
          "insert_one; ratio = 4 x insert_one time / turn time, a store's ceiling there):\n"
          f"  {'layout':45s}{'ms/turn':>8}{'insert_one calls':>18}{'server CPU ms':>15}{'ratio':>7}"
          f"{'in server CPU':>15}")  # fmt: skip
    for name, layout in figures["layouts"].items():
        print(f"  {name:45s}{layout['ms']:8.2f}{layout['insert_ones']:18.2f}{layout['server_cpu_ms']:15.2f}"
              f"{layout['ratio']:7.2f}{layout['cpu_ratio']:15.2f}")  # fmt: skip
    print(f"\nyardstick: raw insert_one of an event document   driver default /s   j=true (store's) /s   server CPU "
          f"ms/insert (j)   load   (medians of {args.passes} passes; min-max)")  # fmt: skip
    layouts = (("raw_seq1", "sequential, 1 process"), ("raw_seq3", "sequential, 3 processes"),
               ("raw_conc1", f"concurrent, {tasks} tasks, 1 process"),
               ("raw_conc3", f"concurrent, {tasks} tasks, 3 processes"))  # fmt: skip
    for key, label in layouts:
        plain, journaled = figures[key + "_default"], figures[key + "_j"]
        server = f"{journaled['server_cpu_ms']:.2f}" if "server_cpu_ms" in journaled else "n/a"
        print(f"  {label:45s}{plain['per_s']:6.0f} ({spread(plain['each_per_s'], '.0f')})  "
              f"{journaled['per_s']:6.0f} ({spread(journaled['each_per_s'], '.0f')})  {server:>12s}  "
              f"{journaled['load']:5.1f}")  # fmt: skip
    print("\nturns/s (N conv x K turns)    turns/s (min-max)   runner CPU ms/turn  server CPU ms/turn   ratio vs "
          "insert_one: default   j=true (min-max)   in CPU time, j=true (min-max)   (target 0.7)")  # fmt: skip
    for layout in ("seq1", "seq3", "conc1", "conc3"):
        for tag in tags:
            result = figures[f"{tag}_{layout}"]
            label = f"{'sequential' if layout.startswith('seq') else f'{tasks} tasks'}, {layout[-1]} proc"
            label += " (baseline)" if tag == "base" else ""
            server = f"{result['server_cpu_ms']:.2f}" if "server_cpu_ms" in result else "n/a"
            cpu_ratio = (
                f"{result['cpu_ratio_j']:.2f} ({spread(result['each_cpu_ratio_j'])})"
                if "cpu_ratio_j" in result
                else "n/a"
            )
            print(f"  {label:28s}{result['per_s']:7.1f} ({spread(result['each_per_s'], '.1f')})  "
                  f"{result['cpu_ms']:8.2f}  {server:>18s}  {result['ratio_default']:21.2f}  "
                  f"{result['ratio_j']:12.2f} ({spread(result['each_ratio_j'])})  {cpu_ratio:>22s}")  # fmt: skip
    print(f"  ({args.n} conversations x {args.k} turns; medians over the passes, each ratio taken against the raw "
          "insert_one run of the same layout just before it: sequential against sequential, concurrent against "
          "concurrent, 3 processes against 3 processes. In CPU time: writes per turn x (server + client CPU of "
          "one insert_one) / (server + runner CPU of one turn))")  # fmt: skip
    for events, seconds in figures["cold_resume_s"].items():
        print(f"cold resume, log of {events:6d} events           {seconds * 1000:9.1f} ms")
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--uri", default=os.environ.get("DYNAPROMPT_BENCH_MONGODB_URI"), help="a server to use")
    parser.add_argument("--n", type=int, default=60, help="conversations (divisible by 3)")
    parser.add_argument("--k", type=int, default=10, help="turns per conversation")
    parser.add_argument("--concurrency", type=int, default=0, help="tasks in the concurrent runs (0: N)")
    parser.add_argument("--raw", type=int, default=600, help="insert_one calls for each yardstick run")
    parser.add_argument("--passes", type=int, default=3, help="passes over the layouts (medians are printed)")
    parser.add_argument("--raw-turns", type=int, default=200, help="turns of raw driver writes")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the write-cost and layout tables")
    parser.add_argument("--layout-turns", type=int, default=30, help="raw turns per layout and round (layout table)")
    parser.add_argument("--count-n", type=int, default=20, help="conversations of the run that counts writes")
    parser.add_argument("--count-k", type=int, default=5, help="turns each in the run that counts writes")
    parser.add_argument("--log-sizes", default="100,1000,10000", help="event counts for cold resume")
    parser.add_argument("--repeats", type=int, default=3, help="cold resumes per size (median)")
    parser.add_argument(
        "--retry-writes", action="store_true", help="keep the driver's retryable writes on SecantusDB (see OPTIONS)"
    )
    parser.add_argument("--baseline", help="a checkout whose dynaprompt to measure too, interleaved (before/after)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="bench-mongo-") as folder:
        server = None
        uri = args.uri
        if uri is None:
            server, uri = start_secantus(Path(folder))
            global SERVER_PID, OPTIONS
            SERVER_PID = server.pid
            OPTIONS = "" if args.retry_writes else "?retryWrites=false"
        try:
            figures = measure(args, uri.rstrip("/"))
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    report(args, figures)


if __name__ == "__main__":
    main()
