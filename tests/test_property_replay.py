"""Replay is invisible (DESIGN.md invariant 3), as a hypothesis property.

Hypothesis writes a *program*: nested sequences and branches of every effect
(send, scheduled send, cancel, wait_for_reply with and without a timeout and
branching on the reply or its absence, sleep, sleep_until, now, call, sub-dialogs
both async and plain, finish inside a sub, set_timezone, an unparseable time, a
raise). One interpreter runs it as a dialog. Hypothesis also writes the user's
behaviour: replies, bursts, silences (the clock jumps and due timers fire), bare
clock jumps, bare ``run_due`` calls, and starting the id again (a new run on the
same log once the last one ended; an error while it runs).

The same program and behaviour run twice, on separate stores and clocks:

* warm: one ``Runner`` for the whole conversation, never restarted;
* cold: a brand-new ``Runner`` (and for SQLite a newly opened store) for every
  single step, resuming from the log.

The channel refuses the first hand-off of every "🐉" message, so hand-offs that
stay queued and are retried later are part of every scenario that sends one.

Both must show the user the same thing (each step's status or error, the
transcript, the messages handed to the channel), leave the same event log, and
run every ``call()`` as often as the log says it was attempted (never again on
replay). The runs are repeated with the live-generator
cache on and off, on the memory and SQLite stores; the SQLite runs must also
equal the memory store's.

A second property checks the pure engine alone: after every step, a fresh
``Execution`` fed the log so far produces no new event and stands where the
original stands.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dynaprompt import (
    CallError,
    DynapromptError,
    ListChannel,
    Message,
    Runner,
    Store,
    call,
    cancel,
    dialog,
    finish,
    now,
    open_store,
    send,
    set_timezone,
    sleep,
    sleep_until,
    wait_for_reply,
)
from dynaprompt.dialogs import Dialog
from dynaprompt.events import Called, Event, Started
from dynaprompt.replay import Execution
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # a Monday
CONVERSATION = "prop"

# -- the program interpreter ---------------------------------------------------------------

Block = list[dict[str, Any]]
CALLS: Counter[str] = Counter()  # how often each labelled call() really ran, in the current run


def count(label: str, fail: str) -> dict[str, Any]:
    """Count the attempt; fail ``"always"``, on the ``"first"`` attempt ever, or ``"never"``."""
    CALLS[label] += 1
    if fail == "always" or (fail == "first" and CALLS[label] == 1):
        raise ValueError(f"{label} failed on purpose, attempt {CALLS[label]}")
    return {"label": label, "ran": CALLS[label]}


async def count_async(label: str, fail: str) -> dict[str, Any]:
    await anyio.lowlevel.checkpoint()
    return count(label, fail)


def instant(spec: Any) -> datetime | str:
    """A time spec of the program: seconds after START, or a phrase."""
    return spec if isinstance(spec, str) else START + timedelta(seconds=spec)


def walk(block: Block, scheduled: list[str]) -> Generator[Any, Any, Any]:
    """Yield the effects of ``block`` in order; the plain-generator core both dialog kinds run."""
    for step in block:
        op = step["op"]
        if op == "send":
            yield send(step["text"])
        elif op == "send_at":
            scheduled.append((yield send(step["text"], at=instant(step["when"]))))
        elif op == "cancel":
            target = scheduled[step["pick"] % len(scheduled)] if scheduled else f"{CONVERSATION}:999"
            done = yield cancel(target)
            yield send(f"cancel {target}: {done!r}")
        elif op == "wait":
            reply = yield wait_for_reply(timeout=step["timeout"])
            if reply is None:
                yield send("no reply")
                branch = "none"
            else:
                yield send(f"got {reply.text!r} id={reply.id} at {reply.at!r}")
                branch = "even" if len(reply.text) % 2 == 0 else "odd"
            yield from walk(step[branch], scheduled)
        elif op == "sleep":
            woke = yield sleep(step["duration"])
            yield send(f"slept until {woke!r}")
        elif op == "sleep_until":
            woke = yield sleep_until(instant(step["when"]))
            yield send(f"slept until {woke!r}")
        elif op == "bad_time":
            try:
                yield sleep_until("when pigs fly")
            except DynapromptError as exc:
                yield send(f"bad time: {type(exc).__name__}: {exc}")
        elif op == "now":
            read = yield now()
            yield send(f"now {read!r}")
        elif op == "call":
            fn = count_async if step["async"] else count
            try:
                result = yield call(fn, step["label"], step["fail"]).with_retries(step["retries"], delay=0)
            except CallError as exc:
                yield send(f"call failed: {type(exc).__name__}: {exc}")
            else:
                yield send(f"call {result!r}")
        elif op == "sub":
            sub = sub_async if step["async"] else sub_plain
            try:
                result = yield sub(step["body"])
            except Exception as exc:
                yield send(f"sub failed: {type(exc).__name__}: {exc}")
            else:
                yield send(f"sub gave {result!r}")
        elif op == "tz":
            yield set_timezone(step["zone"])
        elif op == "finish":
            yield finish(step["value"])
        elif op == "raise":
            raise ValueError(f"raised at {step['where']}")
        else:  # pragma: no cover - the strategies make no other op
            raise AssertionError(op)
    return {"steps": len(block), "scheduled": len(scheduled)}


async def run_async(program: Block) -> AsyncGenerator[Any, Any]:
    """``walk`` driven from an async generator (which has no ``yield from``), awaiting between yields."""
    walker = walk(program, [])
    try:
        effect = next(walker)
        while True:
            await anyio.lowlevel.checkpoint()
            try:
                value = yield effect
            except Exception as exc:
                effect = walker.throw(exc)
            else:
                effect = walker.send(value)
    except StopIteration as stop:
        yield finish(stop.value)


def run_plain(program: Block) -> Generator[Any, Any, Any]:
    return (yield from walk(program, []))


top_async = dialog(name="property_replay:top_async")(run_async)
top_plain = dialog(name="property_replay:top_plain")(run_plain)
sub_async = dialog(name="property_replay:sub_async")(run_async)
sub_plain = dialog(name="property_replay:sub_plain")(run_plain)

# -- strategies -------------------------------------------------------------------------------

texts = st.sampled_from(["hi", "again?", "🐉", ""])
instants = st.one_of(
    st.integers(min_value=-7200, max_value=4 * 86400),  # seconds after START; negative is past
    st.sampled_from(["in 10 minutes", "tomorrow at 9am", "next monday 8:00", "in 2 hours", "18:30"]),
)
durations = st.one_of(
    st.integers(min_value=0, max_value=3 * 3600),
    st.sampled_from([0.000001, 0.5, 1799.999999, "90 minutes", "1h30m", "2 days"]),
)
zones = st.sampled_from(["UTC", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"])


def ops(body: st.SearchStrategy[Block]) -> st.SearchStrategy[dict[str, Any]]:
    """One statement; ``body`` makes the blocks of branches and sub-dialogs. Weights keep the
    conversation-ending statements rare, so most programs get deep enough to be interesting."""
    weighted = [
        (3, st.fixed_dictionaries({"op": st.just("send"), "text": texts})),
        (2, st.fixed_dictionaries({"op": st.just("send_at"), "text": texts, "when": instants})),
        (2, st.fixed_dictionaries({"op": st.just("cancel"), "pick": st.integers(0, 3)})),
        (2, st.fixed_dictionaries({"op": st.just("sleep"), "duration": durations})),
        (2, st.fixed_dictionaries({"op": st.just("sleep_until"), "when": instants})),
        (1, st.fixed_dictionaries({"op": st.just("now")})),
        (
            3,
            st.fixed_dictionaries(
                {
                    "op": st.just("call"),
                    "async": st.booleans(),
                    "fail": st.sampled_from(["never", "always", "first"]),
                    "retries": st.integers(0, 1),
                }
            ),
        ),
        (1, st.fixed_dictionaries({"op": st.just("tz"), "zone": zones})),
        (1, st.fixed_dictionaries({"op": st.just("bad_time")})),
        (
            1,
            st.fixed_dictionaries(
                {"op": st.just("finish"), "value": st.sampled_from([None, 1, "done", [1, {"a": 2}]])}
            ),
        ),
        (1, st.fixed_dictionaries({"op": st.just("raise")})),
        (
            5,
            st.fixed_dictionaries(
                {
                    "op": st.just("wait"),
                    "timeout": st.one_of(st.none(), durations),
                    "none": body,
                    "even": body,
                    "odd": body,
                }
            ),
        ),
        (2, st.fixed_dictionaries({"op": st.just("sub"), "async": st.booleans(), "body": body})),
    ]
    return st.one_of(*[strategy for weight, strategy in weighted for _ in range(weight)])


def number(block: Block, path: str = "s") -> Block:
    """Give every call a unique label and every raise its place, so counts and messages say which one."""
    numbered = []
    for i, step in enumerate(block):
        step = dict(step)
        where = f"{path}.{i}"
        if step["op"] == "call":
            step["label"] = where
        elif step["op"] == "raise":
            step["where"] = where
        for key in ("none", "even", "odd", "body"):
            if key in step:
                step[key] = number(step[key], f"{where}.{key}")
        numbered.append(step)
    return numbered


blocks: st.SearchStrategy[Block] = st.recursive(
    st.lists(ops(st.just([])), max_size=3),
    lambda inner: st.lists(ops(inner), max_size=4),
    max_leaves=20,
)
programs = st.lists(ops(blocks), min_size=2, max_size=8).map(number)

user_steps = st.lists(
    st.one_of(
        st.tuples(st.just("reply"), st.sampled_from(["", "a", "ab", "yes", "über"])),
        st.tuples(st.just("burst"), st.lists(st.sampled_from(["x", "yz"]), min_size=2, max_size=3)),
        st.tuples(st.just("silence"), st.sampled_from([0.5, 1, 60, 600, 1800, 3600, 5400, 7200, 86400, 3 * 86400])),
        st.tuples(st.just("jump"), st.sampled_from([30, 3600, 86400])),
        st.tuples(st.just("run_due"), st.none()),
        st.tuples(st.just("restart"), st.none()),  # start the id again: a new run on the same log once ended
    ),
    min_size=1,
    max_size=12,
)
top_dialogs = st.sampled_from([top_async, top_plain])

# -- running a scenario ----------------------------------------------------------------------


@dataclass
class Run:
    """What one run showed: per-step outcomes, transcript, channel, log and call counts."""

    outcomes: list[Any] = field(default_factory=list)
    transcript: list[Any] = field(default_factory=list)
    handed: list[Any] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)


def actions(top: Dialog, program: Block, steps: list[tuple[str, Any]]) -> list[Callable[[Runner, VirtualClock], Any]]:
    """The scenario as single steps, each done by some runner on the conversation's clock."""

    def start(runner: Runner, clock: VirtualClock) -> Any:
        return runner.start(top, CONVERSATION, program)

    def reply(text: str) -> Callable[[Runner, VirtualClock], Any]:
        return lambda runner, clock: runner.deliver(CONVERSATION, text)

    def silence(seconds: float) -> Callable[[Runner, VirtualClock], Any]:
        async def act(runner: Runner, clock: VirtualClock) -> int:
            clock.advance(seconds)
            return await runner.run_due()

        return act

    def jump(seconds: float) -> Callable[[Runner, VirtualClock], Any]:
        async def act(runner: Runner, clock: VirtualClock) -> None:
            clock.advance(seconds)

        return act

    done: list[Callable[[Runner, VirtualClock], Any]] = [start]
    for kind, value in steps:
        if kind == "reply":
            done.append(reply(value))
        elif kind == "burst":
            done += [reply(text) for text in value]
        elif kind == "silence":
            done.append(silence(value))
        elif kind == "jump":
            done.append(jump(value))
        elif kind == "restart":
            done.append(start)
        else:
            done.append(lambda runner, clock: runner.run_due())
    return done


async def outcome_of(act: Callable[[Runner, VirtualClock], Any], runner: Runner, clock: VirtualClock) -> Any:
    try:
        result = await act(runner, clock)
    except DynapromptError as exc:
        return ("raised", type(exc).__name__, str(exc))
    return result.model_dump() if hasattr(result, "model_dump") else result


async def finish_run(run: Run, store: Store, channel: ListChannel) -> Run:
    async with Runner(store, channel, clock=VirtualClock(START)) as reader:
        run.transcript = [entry.model_dump() for entry in await reader.transcript(CONVERSATION)]
    run.events = await store.load(CONVERSATION)
    run.handed = [message.model_dump() for message in channel.messages]
    run.calls = Counter(CALLS)
    return run


class RefusesDragonsOnce(ListChannel):
    """A channel that refuses the first hand-off of every "🐉" message, so queued hand-offs are retried."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    async def deliver(self, message: Message) -> None:
        if message.text == "🐉" and message.id not in self.refused:
            self.refused.add(message.id)
            raise ConnectionError(f"{message.id} refused once")
        await super().deliver(message)


async def warm_run(top: Dialog, program: Block, steps: list[tuple[str, Any]], store: Store, cache: bool) -> Run:
    CALLS.clear()
    run, clock, channel = Run(), VirtualClock(START), RefusesDragonsOnce()
    async with Runner(store, channel, clock=clock, cache_size=1024 if cache else 0) as runner:
        for act in actions(top, program, steps):
            run.outcomes.append(await outcome_of(act, runner, clock))
    return await finish_run(run, store, channel)


async def cold_run(
    top: Dialog, program: Block, steps: list[tuple[str, Any]], reopen: Callable[[], Any], cache: bool
) -> Run:
    CALLS.clear()
    run, clock, channel = Run(), VirtualClock(START), RefusesDragonsOnce()
    for act in actions(top, program, steps):
        async with reopen() as store, Runner(store, channel, clock=clock, cache_size=1024 if cache else 0) as runner:
            run.outcomes.append(await outcome_of(act, runner, clock))
    async with reopen() as store:
        return await finish_run(run, store, channel)


def assert_same(warm: Run, cold: Run) -> None:
    for step, (w, c) in enumerate(zip(warm.outcomes, cold.outcomes, strict=True)):
        assert w == c, f"step {step}: warm {w!r} != cold {c!r}"
    assert cold.transcript == warm.transcript
    assert cold.handed == warm.handed
    assert [e.model_dump() for e in cold.events] == [e.model_dump() for e in warm.events]
    # Each recorded call ran exactly as often as it records attempts, never again on replay (a start of
    # the id again is a new run, whose calls run anew).
    assert cold.calls == warm.calls
    attempts = [e.attempts for e in warm.events if isinstance(e, Called)]
    assert sum(warm.calls.values()) == sum(attempts), warm.calls
    if sum(1 for e in warm.events if e.kind == "started") == 1:
        assert list(warm.calls.values()) == attempts, f"a call ran more often than it records: {warm.calls}"


def store_opener(kind: str, folder: Path) -> Callable[[], Callable[[], Any]]:
    """For each run: a function that opens that run's store (the same one each time)."""

    def for_one_run() -> Callable[[], Any]:
        if kind == "memory":
            shared: list[Store] = []

            @asynccontextmanager
            async def memory() -> AsyncIterator[Store]:
                if not shared:
                    shared.append(await open_store("memory://"))
                yield shared[0]

            return memory
        url = f"sqlite:///{folder}/{uuid.uuid4().hex}.db"

        @asynccontextmanager
        async def sqlite() -> AsyncIterator[Store]:
            store = await open_store(url)
            try:
                yield store
            finally:
                await store.close()

        return sqlite

    return for_one_run


async def check_scenario(
    kind: str, folder: Path, cache: bool, top: Dialog, program: Block, steps: list[tuple[str, Any]]
) -> None:
    opener = store_opener(kind, folder)
    async with opener()() as store:
        warm = await warm_run(top, program, steps, store, cache)
    cold = await cold_run(top, program, steps, opener(), cache)
    assert_same(warm, cold)
    if kind != "memory":  # and the store is invisible too: the reference store shows the same
        async with store_opener("memory", folder)()() as store:
            reference = await warm_run(top, program, steps, store, cache)
        assert_same(reference, warm)


# The SQLite leg opens a file per step of the cold run; a quarter of the profile's examples keeps the
# file's runtime in budget while the memory leg runs the profile's full count.
SQLITE_EXAMPLES = max(10, settings.default.max_examples // 4)


# Found by this property: scheduled sends delivered after the dialog ended were handed over again by a
# replayed execution, which never read the deliveries recorded after the end of the run.
DELIVERED_AFTER_THE_END = example(
    top=top_async,
    program=[{"op": "send", "text": "hi"}, {"op": "send_at", "text": "hi", "when": 1}],
    steps=[("silence", 1)],
)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
@given(top=top_dialogs, program=programs, steps=user_steps)
@DELIVERED_AFTER_THE_END
async def test_replay_is_invisible_on_memory(
    tmp_path_factory: pytest.TempPathFactory, cache: bool, top: Dialog, program: Block, steps: list[tuple[str, Any]]
) -> None:
    await check_scenario("memory", tmp_path_factory.getbasetemp(), cache, top, program, steps)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
@settings(max_examples=SQLITE_EXAMPLES)
@given(top=top_dialogs, program=programs, steps=user_steps)
@DELIVERED_AFTER_THE_END
async def test_replay_is_invisible_on_sqlite(
    tmp_path_factory: pytest.TempPathFactory, cache: bool, top: Dialog, program: Block, steps: list[tuple[str, Any]]
) -> None:
    await check_scenario("sqlite", tmp_path_factory.mktemp("replay"), cache, top, program, steps)


# -- the pure engine alone --------------------------------------------------------------------


class Driven:
    """An execution driven by hand the way a runner drives it, keeping the log it produces."""

    def __init__(self, top: Dialog, program: Block) -> None:
        self.top = top
        self.started = Started(seq=1, at=START, dialog=top.name, args=[program])
        self.execution = Execution.begin(CONVERSATION, top, self.started)
        self.log: list[Event] = [self.started]
        self.now = START

    async def advance(self) -> None:
        execution = self.execution
        while True:
            outcome = await execution.advance(self.now)
            self.log += outcome.events
            if outcome.call is None:
                if execution.deliver_first is None:
                    break
                # caught up late: the scheduled sends due before the timer are handed over first
                due = [f"{CONVERSATION}:{sent.seq}" for sent in execution.due_messages(execution.deliver_first)]
                self.log += execution.mark_delivered(due, self.now)
                continue
            effect = outcome.call
            try:
                result = effect.fn(*effect.arguments, **effect.keywords)
                if hasattr(result, "__await__"):
                    result = await result
                error = None
            except Exception as exc:
                result, error = None, exc
            execution.record_call(result, error, self.now)
        due = [f"{CONVERSATION}:{sent.seq}" for sent in execution.due_messages(self.now)]
        self.log += execution.mark_delivered(due, self.now)

    async def assert_replay_adds_nothing(self) -> None:
        fresh = Execution.begin(CONVERSATION, self.top, self.started)
        fresh.extend(self.log[1:])
        try:
            outcome = await fresh.advance(self.now)
            assert outcome.call is None, f"replay asked to run {outcome.call.name} again"
            assert outcome.events == [], f"replay of {len(self.log)} events added {outcome.events}"
            assert (fresh.state, fresh.result, fresh.error) == (
                self.execution.state,
                self.execution.result,
                self.execution.error,
            )
            assert fresh.wake_at() == self.execution.wake_at()
            assert fresh.due_messages(self.now) == []
        finally:
            await fresh.close()


@given(top=top_dialogs, program=programs, steps=user_steps)
@DELIVERED_AFTER_THE_END
async def test_replaying_the_log_in_a_fresh_execution_adds_nothing(
    top: Dialog, program: Block, steps: list[tuple[str, Any]]
) -> None:
    CALLS.clear()
    driven = Driven(top, program)
    try:
        await driven.advance()
        await driven.assert_replay_adds_nothing()
        for kind, value in steps:
            if driven.execution.ended:
                break
            if kind == "jump":  # the clock moves but nobody advances: nothing to check yet
                driven.now += timedelta(seconds=value)
                continue
            if kind == "silence":
                driven.now += timedelta(seconds=value)
            for text in [value] if kind == "reply" else value if kind == "burst" else []:
                driven.log.append(driven.execution.input_reply(text, {}, driven.now))
            await driven.advance()
            await driven.assert_replay_adds_nothing()
    finally:
        await driven.execution.close()
    assert all(n == 1 for n in CALLS.values())
