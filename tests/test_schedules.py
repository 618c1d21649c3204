"""Scheduled messages and scheduled conversations on a virtual clock: days pass in milliseconds."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from dynaprompt import (
    DynapromptError,
    ListChannel,
    Runner,
    Store,
    TimeParseError,
    UnknownTimeZoneError,
    cancel,
    dialog,
    open_store,
    send,
    wait_for_reply,
)
from dynaprompt.errors import RecurrenceError, ScheduleError
from dynaprompt.stores.memory import MemoryStore
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio


@dialog(name="tests.schedules:good_morning")
async def good_morning(name: str):
    yield send(f"Good morning, {name}!")
    reply = yield wait_for_reply(timeout="30 minutes")
    yield send("Have a good day." if reply is None else f"Glad to hear: {reply.text}")


@dialog(name="tests.schedules:nudges")
async def nudges():
    first = yield send("in an hour", at="in 1 hour")
    yield send("in two hours", at="in 2 hours")
    yield send("right away")
    doomed = yield send("never", at="in 3 hours")
    yield send("in 30 minutes", at="in 30 minutes")
    cancelled = yield cancel(doomed)
    yield send(f"cancelled={cancelled}")
    reply = yield wait_for_reply()
    again = yield cancel(first)
    yield send(f"got {reply.text}; cancelling a delivered one gives {again}")


async def step_to(clock: VirtualClock, runner: Runner, when: datetime) -> None:
    clock.advance(when - clock.now())
    await runner.run_due()


async def test_scheduled_sends_arrive_in_due_order_and_not_before(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    start = clock.now()
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(nudges, "n1")
        assert channel.texts() == ["right away", "cancelled=True"]
        await step_to(clock, runner, start + timedelta(minutes=29, seconds=59))
        assert channel.texts() == ["right away", "cancelled=True"]
        await step_to(clock, runner, start + timedelta(minutes=30))
        assert channel.texts()[-1] == "in 30 minutes"
        await step_to(clock, runner, start + timedelta(hours=5))
    assert channel.texts() == ["right away", "cancelled=True", "in 30 minutes", "in an hour", "in two hours"]
    late = channel.messages[-1]
    assert late.metadata["due_at"] == (start + timedelta(hours=2)).isoformat()
    assert "never" not in channel.texts()


async def test_cancel_of_a_delivered_message_is_false_and_transcript_shows_delivery_time(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    start = clock.now()
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(nudges, "n1")
        await step_to(clock, runner, start + timedelta(hours=1, minutes=10))
        entries = await runner.transcript("n1")
        assert [e.text for e in entries] == ["right away", "cancelled=True", "in 30 minutes", "in an hour"]
        assert entries[-1].at == start + timedelta(hours=1, minutes=10)  # delivered late, when the runner ran
        await runner.deliver("n1", "ok")
    assert channel.texts()[-1] == "got ok; cancelling a delivered one gives False"


async def test_scheduled_send_due_while_runner_was_down_is_delivered_on_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/down.db"
    clock = VirtualClock(datetime(2026, 1, 5, 9, tzinfo=UTC))
    first_channel, second_channel = ListChannel(), ListChannel()
    store = await open_store(url)
    async with Runner(store, first_channel, clock=clock) as runner:
        await runner.start(nudges, "n1")
    await store.close()
    clock.advance(timedelta(hours=6))  # nobody is running
    store = await open_store(url)
    async with Runner(store, second_channel, clock=clock, cache_size=0) as runner:
        await runner.run_due()
    await store.close()
    assert second_channel.texts() == ["in 30 minutes", "in an hour", "in two hours"]
    assert [m.metadata["due_at"] for m in second_channel.messages] == [
        "2026-01-05T09:30:00+00:00",
        "2026-01-05T10:00:00+00:00",
        "2026-01-05T11:00:00+00:00",
    ]


async def test_daily_schedule_fires_at_nine_local_across_dst_and_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/daily.db"
    clock = VirtualClock(datetime(2026, 3, 27, 12, tzinfo=UTC))
    channel = ListChannel()
    store = await open_store(url)
    async with Runner(store, channel, clock=clock, tz="Europe/London") as runner:
        schedule_id = await runner.schedule(good_morning, "ann", "Ann", every="every day at 9am")
        await step_to(clock, runner, datetime(2026, 3, 28, 8, 59, 59, tzinfo=UTC))
        assert channel.texts() == []
        await step_to(clock, runner, datetime(2026, 3, 28, 9, tzinfo=UTC))
        assert channel.texts() == ["Good morning, Ann!"]
    await store.close()
    store = await open_store(url)  # a new runner process, in effect
    async with Runner(store, channel, clock=clock, tz="Europe/London", cache_size=0) as runner:
        [listed] = await runner.schedules()
        assert listed.id == schedule_id
        assert listed.next_at == datetime(2026, 3, 29, 8, tzinfo=UTC)  # 9am BST
        await step_to(clock, runner, datetime(2026, 3, 29, 7, 59, tzinfo=UTC))
        assert channel.texts() == ["Good morning, Ann!", "Have a good day."]
        await step_to(clock, runner, datetime(2026, 3, 29, 8, tzinfo=UTC))
        assert channel.texts()[-1] == "Good morning, Ann!"
        status = await runner.status("ann")
        assert status.run == 2
    await store.close()


async def test_one_off_schedule_fires_once_and_disappears(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    async with Runner(store, channel, clock=clock) as runner:
        await runner.schedule(good_morning, "bob", "Bob", at="tomorrow at 9am")
        assert len(await runner.schedules()) == 1
        await step_to(clock, runner, clock.now() + timedelta(days=1))
        await step_to(clock, runner, clock.now() + timedelta(days=3))
        assert await runner.schedules() == []
    assert channel.texts().count("Good morning, Bob!") == 1


async def test_unschedule_stops_future_fires(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock) as runner:
        schedule_id = await runner.schedule(good_morning, "cy", "Cy", every="every day at 10am")
        await step_to(clock, runner, clock.now() + timedelta(hours=2))
        assert await runner.unschedule(schedule_id) is True
        assert await runner.unschedule(schedule_id) is False
        await step_to(clock, runner, clock.now() + timedelta(days=3))
    assert channel.texts().count("Good morning, Cy!") == 1


async def test_two_runners_on_one_store_never_fire_one_occurrence_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/two.db"
    clock = VirtualClock(datetime(2026, 1, 5, 8, tzinfo=UTC))
    store_a, store_b = await open_store(url), await open_store(url)
    channel = ListChannel()
    async with Runner(store_a, channel, clock=clock) as first, Runner(store_b, channel, clock=clock) as second:
        await first.schedule(good_morning, "dee", "Dee", every="every day at 9am")
        for day in range(5):
            [listed] = await second.schedules()
            clock.advance(listed.next_at - clock.now())
            runners = (first, second) if day % 2 else (second, first)
            for runner in runners:
                await runner.run_due()
            clock.advance(timedelta(hours=1))
            for runner in runners:
                await runner.run_due()
    await store_a.close()
    await store_b.close()
    assert channel.texts().count("Good morning, Dee!") == 5
    assert len({m.id for m in channel.messages}) == len(channel.messages)


async def test_missed_fire_runs_once_late_within_grace(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock, schedule_grace=timedelta(hours=2)) as runner:
        await runner.schedule(good_morning, "eve", "Eve", every="every 30 minutes")
        clock.advance(timedelta(hours=1, minutes=45))  # three occurrences missed, the first 75 minutes ago
        await runner.run_due()
        [listed] = await runner.schedules()
    assert channel.texts() == ["Good morning, Eve!"]  # coalesced into one late run
    assert listed.next_at == clock.now() + timedelta(minutes=15)


async def test_missed_fire_beyond_grace_is_skipped(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock, schedule_grace=timedelta(minutes=10)) as runner:
        await runner.schedule(good_morning, "fay", "Fay", at="in 1 hour", every="every day at 10am")
        clock.advance(timedelta(hours=3))
        await runner.run_due()
        assert channel.texts() == []
        [listed] = await runner.schedules()
        assert listed.fired == 0
        assert listed.next_at == datetime(2026, 1, 6, 10, tzinfo=UTC)


async def test_skip_policy_fires_only_when_on_time(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock, schedule_missed="skip") as runner:
        await runner.schedule(good_morning, "gus", "Gus", every="every day at 10am")
        clock.advance(timedelta(hours=1, minutes=5))  # five minutes late: skipped
        await runner.run_due()
        assert channel.texts() == []
        clock.advance(timedelta(days=1) - timedelta(minutes=5))  # exactly on time
        await runner.run_due()
    assert channel.texts() == ["Good morning, Gus!"]


@dialog(name="tests.schedules:long_chat")
async def long_chat(name: str):
    yield send(f"Hello {name}, talk to me.")
    yield wait_for_reply()
    yield send("Bye now.")


async def test_overlap_skip_leaves_the_live_run_alone(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock) as runner:
        await runner.schedule(long_chat, "hal", "Hal", every="every hour")
        await step_to(clock, runner, clock.now() + timedelta(hours=1))
        await step_to(clock, runner, clock.now() + timedelta(hours=1))
        assert channel.texts() == ["Hello Hal, talk to me."]
        assert (await runner.status("hal")).run == 1
        [listed] = await runner.schedules()
        assert listed.next_at == clock.now() + timedelta(hours=1)


async def test_overlap_queue_starts_when_the_old_run_ends(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    async with Runner(store, channel, clock=clock, schedule_overlap="queue") as runner:
        await runner.schedule(long_chat, "ida", "Ida", every="every hour")
        await step_to(clock, runner, clock.now() + timedelta(hours=1))
        await step_to(clock, runner, clock.now() + timedelta(hours=1))
        assert channel.texts() == ["Hello Ida, talk to me."]
        await runner.deliver("ida", "done")
        await runner.run_due()
        assert channel.texts() == ["Hello Ida, talk to me.", "Bye now.", "Hello Ida, talk to me."]
        assert (await runner.status("ida")).run == 2


async def test_overlap_replace_ends_the_old_run(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock, schedule_overlap="replace") as runner:
        await runner.schedule(long_chat, "jo", "Jo", every="every hour")
        await step_to(clock, runner, clock.now() + timedelta(hours=1))
        await step_to(clock, runner, clock.now() + timedelta(hours=1))
        status = await runner.status("jo")
        entries = await runner.transcript("jo")
    assert status.run == 2
    assert status.state == "waiting_for_reply"
    assert [e.text for e in entries] == ["Hello Jo, talk to me.", "Hello Jo, talk to me."]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"at": datetime(2026, 1, 4, tzinfo=UTC)}, ScheduleError),
        ({"at": "yesterday at 9am"}, ScheduleError),
        ({"at": "when pigs fly"}, TimeParseError),
        ({"every": "every fortnight"}, RecurrenceError),
        ({"every": "every day at 9am", "tz": "Mars/Olympus"}, UnknownTimeZoneError),
        ({"every": "* * * * *"}, None),
        ({"every": "every 30 minutes"}, None),
        ({}, ScheduleError),
    ],
)
async def test_bad_schedules_get_clear_errors(
    store: Store, clock: VirtualClock, kwargs: dict[str, object], error: type[Exception] | None
) -> None:
    async with Runner(store, clock=clock, min_schedule_interval=timedelta(hours=1)) as runner:
        expected = error or ScheduleError  # the last two fire more often than the minimum
        with pytest.raises(expected) as raised:
            await runner.schedule(good_morning, "kim", "Kim", **kwargs)  # type: ignore[arg-type]
        assert isinstance(raised.value, DynapromptError)
        assert await runner.schedules() == []
    if error is None:
        assert "more often than the minimum" in str(raised.value)


class YieldingStore(MemoryStore):
    """A memory store that lets other tasks run inside every call, so two runners truly interleave."""

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attribute):
            return attribute

        async def interleaved(*args: Any, **kwargs: Any) -> Any:
            await anyio.lowlevel.checkpoint()
            result = await attribute(*args, **kwargs)
            await anyio.lowlevel.checkpoint()
            return result

        return interleaved


async def test_concurrent_runners_fire_each_occurrence_once(clock: VirtualClock) -> None:
    store = YieldingStore()
    channel = ListChannel()
    runners = [Runner(store, channel, clock=clock) for _ in range(3)]
    await runners[0].schedule(long_chat, "lee", "Lee", every="every 2 hours", at="in 1 hour")
    for _ in range(4):
        clock.advance(timedelta(hours=1))
        async with anyio.create_task_group() as group:
            for runner in runners:
                group.start_soon(runner.run_due)
        await runners[1].deliver("lee", "bye")
        clock.advance(timedelta(hours=1))
    assert channel.texts() == ["Hello Lee, talk to me.", "Bye now."] * 4
    [listed] = await runners[2].schedules()
    assert listed.fired == 4


async def test_after_a_long_outage_the_latest_occurrence_within_grace_fires(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    async with Runner(store, channel, clock=clock) as runner:  # grace: the default hour
        await runner.schedule(good_morning, "max", "Max", every="every day at 8am")  # first: 2026-01-06 08:00
        clock.advance(timedelta(days=3, hours=23, minutes=20))  # down for days; back at 2026-01-09 08:20
        await runner.run_due()
        [listed] = await runner.schedules()
        [started] = [e for e in await store.load("max") if e.kind == "started"]
    assert channel.texts() == ["Good morning, Max!"]
    assert started.occurrence == datetime(2026, 1, 9, 8, tzinfo=UTC)  # type: ignore[union-attr]
    assert listed.fired == 1
    assert listed.next_at == datetime(2026, 1, 10, 8, tzinfo=UTC)
