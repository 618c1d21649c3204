"""The runner as a user drives it: start, deliver, run_due, serve, status, transcript.

Every test runs on both embedded stores and with the live-generator cache on
and off (off: every advance replays from the log), and asserts on what a user
sees: the channel's messages, the transcript and the status.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from dynaprompt import (
    ConversationEndedError,
    ConversationExistsError,
    ListChannel,
    Message,
    NondeterminismError,
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
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


async def texts(runner: Runner, conversation_id: str) -> list[tuple[str, str]]:
    return [(entry.direction, entry.text) for entry in await runner.transcript(conversation_id)]


# -- order and queueing ----------------------------------------------------------


async def test_replies_sent_while_the_dialog_sleeps_are_queued_and_consumed_in_order(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def slow_reader():
        yield send("I'll read your messages in an hour.")
        yield sleep("1 hour")
        for _ in range(3):
            reply = yield wait_for_reply()
            yield send(f"Read: {reply.text}")

    await runner.start(slow_reader, "c1")
    for text in ("first", "second", "third"):
        clock.advance(60)
        status = await runner.deliver("c1", text)
        assert status.state == "sleeping"
    assert channel.texts() == ["I'll read your messages in an hour."]
    clock.advance(timedelta(hours=1))
    await runner.run_due()
    assert channel.texts()[1:] == ["Read: first", "Read: second", "Read: third"]
    assert (await runner.status("c1")).state == "completed"
    assert await texts(runner, "c1") == [
        ("out", "I'll read your messages in an hour."),
        ("in", "first"),
        ("in", "second"),
        ("in", "third"),
        ("out", "Read: first"),
        ("out", "Read: second"),
        ("out", "Read: third"),
    ]


async def test_reply_delivered_by_another_runner_during_a_call_is_durable_and_consumed_next(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    entered, gate = anyio.Event(), anyio.Event()
    runs: list[str] = []

    async def think() -> str:
        runs.append("ran")
        entered.set()
        await gate.wait()
        return "thought"

    @dialog
    async def busy():
        yield send("thinking...")
        result = yield call(think)
        reply = yield wait_for_reply()
        yield send(f"{result}; you said {reply.text}")

    busy_channel, other_channel = ListChannel(), ListChannel()
    async with (
        Runner(store, busy_channel, clock=clock, cache_size=cache_size) as busy_runner,
        Runner(store, other_channel, clock=clock, cache_size=cache_size) as other_runner,
        anyio.create_task_group() as group,
    ):
        group.start_soon(busy_runner.start, busy, "c1")
        with anyio.fail_after(5):
            await entered.wait()
        during = await other_runner.deliver("c1", "hello")  # returns once durable; the busy runner goes on
        assert during.state == "running"
        assert ("in", "hello") in await texts(other_runner, "c1")
        gate.set()
    assert busy_channel.texts() == ["thinking...", "thought; you said hello"]
    assert runs == ["ran"]  # the conflicting append did not make the call run again
    assert other_channel.texts() == []
    assert (await other_runner.status("c1")).state == "completed"


async def test_reply_delivered_during_a_call_after_a_timer_is_consumed_by_the_busy_runner(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    entered, gate = anyio.Event(), anyio.Event()
    runs: list[str] = []

    async def think() -> str:
        runs.append("ran")
        entered.set()
        await gate.wait()
        return "thought"

    @dialog
    async def wakes_and_thinks():
        yield sleep("1 hour")
        result = yield call(think)
        reply = yield wait_for_reply()
        yield send(f"{result}; you said {reply.text}")

    busy_channel = ListChannel()
    async with (
        Runner(store, busy_channel, clock=clock, cache_size=cache_size) as busy_runner,
        Runner(store, clock=clock, cache_size=cache_size) as other_runner,
    ):
        await busy_runner.start(wakes_and_thinks, "c1")
        clock.advance(timedelta(hours=1))
        async with anyio.create_task_group() as group:
            group.start_soon(busy_runner.run_due)
            with anyio.fail_after(5):
                await entered.wait()
            await other_runner.deliver("c1", "hello")
            gate.set()
        assert busy_channel.texts() == ["thought; you said hello"]
        assert runs == ["ran"]
        assert (await other_runner.status("c1")).state == "completed"


async def test_a_burst_of_replies_is_consumed_one_per_wait_for_reply(runner: Runner, channel: ListChannel) -> None:
    @dialog
    async def one_at_a_time():
        while True:
            reply = yield wait_for_reply()
            yield send(f"Got {reply.text}")
            yield sleep(30)

    await runner.start(one_at_a_time, "c1")
    await runner.deliver("c1", "a")  # consumed at once, then the dialog sleeps
    await runner.deliver("c1", "b")  # queued
    await runner.deliver("c1", "c")  # queued
    assert channel.texts() == ["Got a"]
    clock = runner.clock
    assert isinstance(clock, VirtualClock)
    clock.advance(30)
    await runner.run_due()
    assert channel.texts() == ["Got a", "Got b"]
    clock.advance(30)
    await runner.run_due()
    assert channel.texts() == ["Got a", "Got b", "Got c"]
    assert (await runner.status("c1")).state == "sleeping"


# -- timers ------------------------------------------------------------------------


async def test_wait_for_reply_timeout_gives_none_exactly_when_due(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def nudge():
        reply = yield wait_for_reply(timeout="2 hours")
        yield send("Still there?" if reply is None else f"Hi {reply.text}")

    status = await runner.start(nudge, "c1")
    assert (status.state, status.wake_at) == ("waiting_for_reply", START + timedelta(hours=2))
    clock.advance(timedelta(hours=2) - timedelta(microseconds=1))
    await runner.run_due()
    assert channel.texts() == []
    assert (await runner.status("c1")).state == "waiting_for_reply"
    clock.advance(timedelta(microseconds=1))  # exactly due: <= now
    await runner.run_due()
    assert channel.texts() == ["Still there?"]
    assert (await runner.status("c1")).state == "completed"


async def test_reply_arriving_after_an_unfired_timeout_is_queued_behind_it(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def nudge():
        reply = yield wait_for_reply(timeout="2 hours")
        yield send("Still there?" if reply is None else f"Hi {reply.text}")
        reply = yield wait_for_reply()
        yield send(f"Then: {reply.text}")

    await runner.start(nudge, "c1")
    clock.advance(timedelta(hours=3))  # nobody ran run_due: the timeout is due but has not fired
    await runner.deliver("c1", "sorry, I was out")
    assert channel.texts() == ["Still there?", "Then: sorry, I was out"]


async def test_reply_before_timeout_wins_and_the_timer_never_fires(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def nudge():
        reply = yield wait_for_reply(timeout="2 hours")
        yield send("Still there?" if reply is None else f"Hi {reply.text}")
        yield wait_for_reply()

    await runner.start(nudge, "c1")
    clock.advance(timedelta(hours=1))
    await runner.deliver("c1", "Ann")
    clock.advance(timedelta(hours=5))
    await runner.run_due()
    assert channel.texts() == ["Hi Ann"]


async def test_sleep_until_a_past_instant_happens_at_once(runner: Runner, channel: ListChannel) -> None:
    @dialog
    async def late():
        woke = yield sleep_until(START - timedelta(days=1))
        yield send(f"woke {woke.isoformat()}")

    status = await runner.start(late, "c1")
    assert status.state == "completed"
    assert channel.texts() == [f"woke {(START - timedelta(days=1)).isoformat()}"]


async def test_sleep_wakes_at_its_instant_and_status_says_sleeping_until_then(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def morning():
        woke = yield sleep_until("tomorrow at 9am")
        yield send(f"Good morning, it is {woke.isoformat()}")

    status = await runner.start(morning, "c1")
    tomorrow = datetime(2026, 1, 6, 9, tzinfo=UTC)
    assert (status.state, status.wake_at) == ("sleeping", tomorrow)
    clock.advance(timedelta(hours=23, minutes=59))
    await runner.run_due()
    assert channel.texts() == []
    clock.advance(timedelta(minutes=1))
    await runner.run_due()
    assert channel.texts() == [f"Good morning, it is {tomorrow.isoformat()}"]


# -- scheduled sends ---------------------------------------------------------------


async def test_scheduled_send_does_not_block_and_is_delivered_when_due(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def reminder():
        yield send("Drink water!", at="in 2 hours")
        yield send("I'll remind you.")
        reply = yield wait_for_reply()
        yield send(f"You said {reply.text}")

    status = await runner.start(reminder, "c1")
    assert (status.state, status.wake_at) == ("waiting_for_reply", START + timedelta(hours=2))
    assert channel.texts() == ["I'll remind you."]
    assert await texts(runner, "c1") == [("out", "I'll remind you.")]

    clock.advance(timedelta(hours=1))
    await runner.run_due()
    assert channel.texts() == ["I'll remind you."]
    clock.advance(timedelta(hours=1))
    await runner.run_due()
    assert channel.texts() == ["I'll remind you.", "Drink water!"]
    delivered = channel.messages[-1]
    assert delivered.id == "c1:2"
    assert delivered.metadata["due_at"] == (START + timedelta(hours=2)).isoformat()
    assert await texts(runner, "c1") == [("out", "I'll remind you."), ("out", "Drink water!")]
    assert (await runner.status("c1")).state == "waiting_for_reply"


async def test_late_scheduled_send_carries_its_due_time_and_shows_when_delivered(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def reminder():
        yield send("Stand up!", at=START + timedelta(hours=1))
        yield wait_for_reply()

    await runner.start(reminder, "c1")
    clock.advance(timedelta(hours=5))  # the runner was not running at the due time
    await runner.run_due()
    (message,) = channel.messages
    assert message.text == "Stand up!"
    assert message.metadata["due_at"] == (START + timedelta(hours=1)).isoformat()
    (entry,) = await runner.transcript("c1")
    assert (entry.text, entry.at) == ("Stand up!", START + timedelta(hours=5))
    assert entry.metadata["due_at"] == (START + timedelta(hours=1)).isoformat()


async def test_scheduled_sends_are_delivered_in_due_order(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def two_reminders():
        yield send("second", at="in 2 hours")
        yield send("first", at="in 1 hour")
        yield wait_for_reply()

    await runner.start(two_reminders, "c1")
    clock.advance(timedelta(hours=3))
    await runner.run_due()
    assert channel.texts() == ["first", "second"]
    assert [text for _, text in await texts(runner, "c1")] == ["first", "second"]


async def test_cancelled_scheduled_send_is_never_delivered_nor_in_the_transcript(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def changed_mind():
        message_id = yield send("Meeting at noon", at="in 1 hour")
        cancelled = yield cancel(message_id)
        yield send(f"cancelled={cancelled}")
        again = yield cancel(message_id)
        yield send(f"cancelled again={again}")
        yield wait_for_reply()

    await runner.start(changed_mind, "c1")
    clock.advance(timedelta(hours=2))
    await runner.run_due()
    assert channel.texts() == ["cancelled=True", "cancelled again=False"]
    assert "Meeting at noon" not in [text for _, text in await texts(runner, "c1")]
    assert (await runner.status("c1")).wake_at is None


async def test_a_late_runner_catches_up_in_due_order_sends_before_a_later_timer(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    """No runner was up from before a scheduled send (due in 1 hour) until after a sleep that ends later (in 2
    hours): on catching up, the send is handed over first, as it would have been on time, so the cancel
    after the sleep finds it delivered."""

    @dialog
    async def reminder_then_cleanup():
        message_id = yield send("Stretch!", at="in 1 hour")
        yield sleep(timedelta(hours=2))
        cancelled = yield cancel(message_id)
        yield send(f"cancelled={cancelled}")
        yield wait_for_reply()

    await runner.start(reminder_then_cleanup, "c1")
    clock.advance(timedelta(hours=3))
    await runner.run_due()
    assert channel.texts() == ["Stretch!", "cancelled=False"]
    assert [text for _, text in await texts(runner, "c1")] == ["Stretch!", "cancelled=False"]
    assert (await runner.status("c1")).state == "waiting_for_reply"


async def test_a_late_timeout_also_waits_for_the_sends_due_before_it(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def nudge():
        yield send("Reminder: standup", at="in 10 minutes")
        reply = yield wait_for_reply(timeout="30 minutes")
        yield send("no answer" if reply is None else f"got {reply.text}")
        yield wait_for_reply()

    await runner.start(nudge, "c1")
    clock.advance(timedelta(hours=1))
    await runner.run_due()
    assert channel.texts() == ["Reminder: standup", "no answer"]
    messages = {m.text: m for m in channel.messages}
    assert messages["Reminder: standup"].metadata["due_at"] == "2026-01-05T09:10:00+00:00"


async def test_scheduled_send_of_an_ended_conversation_is_still_delivered_once(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def parting_note():
        yield send("See you tomorrow!", at="tomorrow at 9am")
        yield finish("scheduled")

    status = await runner.start(parting_note, "c1")
    assert (status.state, status.result) == ("completed", "scheduled")
    assert status.wake_at == datetime(2026, 1, 6, 9, tzinfo=UTC)
    clock.advance(timedelta(days=1))
    await runner.run_due()
    await runner.run_due()
    clock.advance(timedelta(days=1))
    await runner.run_due()
    assert channel.texts() == ["See you tomorrow!"]
    assert [text for _, text in await texts(runner, "c1")] == ["See you tomorrow!"]
    after = await runner.status("c1")
    assert (after.state, after.wake_at) == ("completed", None)


async def test_cancel_after_delivery_reports_false(runner: Runner, channel: ListChannel, clock: VirtualClock) -> None:
    @dialog
    async def too_late():
        message_id = yield send("ping", at="in 1 minute")
        yield sleep("2 minutes")
        cancelled = yield cancel(message_id)
        yield send(f"cancelled={cancelled}")

    await runner.start(too_late, "c1")
    clock.advance(60)
    await runner.run_due()
    clock.advance(60)
    await runner.run_due()
    assert channel.texts() == ["ping", "cancelled=False"]


async def test_several_sends_in_a_row_are_delivered_in_order_with_distinct_ids(
    runner: Runner, channel: ListChannel
) -> None:
    @dialog
    async def chatty():
        for word in ("one", "two", "three"):
            yield send(word)

    await runner.start(chatty, "c1")
    assert channel.texts() == ["one", "two", "three"]
    assert [message.id for message in channel.messages] == ["c1:2", "c1:3", "c1:4"]


# -- recorded values ---------------------------------------------------------------


async def test_now_is_recorded_so_a_later_step_sees_the_same_instant(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def stamp():
        started = yield now()
        yield wait_for_reply()
        yield send(f"We started at {started.isoformat()}")

    await runner.start(stamp, "c1")
    clock.advance(timedelta(days=1))
    await runner.deliver("c1", "hi")
    assert channel.texts() == [f"We started at {START.isoformat()}"]


async def test_call_runs_once_and_its_recorded_result_is_reused(runner: Runner, channel: ListChannel) -> None:
    runs: list[str] = []

    def pick_number() -> int:
        runs.append("ran")
        return 42

    @dialog
    async def game():
        number = yield call(pick_number)
        for _ in range(3):
            reply = yield wait_for_reply()
            yield send(f"{reply.text}: the number is {number}")

    await runner.start(game, "c1")
    for guess in ("a", "b", "c"):
        await runner.deliver("c1", guess)
    assert runs == ["ran"]
    assert channel.texts() == ["a: the number is 42", "b: the number is 42", "c: the number is 42"]


async def test_async_call_runs_once(runner: Runner, channel: ListChannel) -> None:
    runs: list[str] = []

    async def fetch(city: str) -> dict[str, str]:
        runs.append(city)
        return {"city": city, "sky": "clear"}

    @dialog
    async def weather():
        forecast = yield call(fetch, "Paris")
        yield wait_for_reply()
        yield send(f"{forecast['city']}: {forecast['sky']}")

    await runner.start(weather, "c1")
    await runner.deliver("c1", "and?")
    assert runs == ["Paris"]
    assert channel.texts() == ["Paris: clear"]


async def test_set_timezone_affects_later_natural_language_times(runner: Runner) -> None:
    @dialog
    async def in_new_york():
        yield set_timezone("America/New_York")
        yield sleep_until("tomorrow at 9am")

    @dialog
    async def in_utc():
        yield sleep_until("tomorrow at 9am")

    new_york = await runner.start(in_new_york, "ny")
    utc = await runner.start(in_utc, "utc")
    assert new_york.wake_at == datetime(2026, 1, 6, 14, tzinfo=UTC)  # 09:00 EST
    assert utc.wake_at == datetime(2026, 1, 6, 9, tzinfo=UTC)


async def test_instants_given_to_the_dialog_are_the_same_warm_and_replayed(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def london():
        yield set_timezone("Europe/London")
        woke = yield sleep_until("tomorrow at 9am")
        stamp = yield now()
        reply = yield wait_for_reply()
        yield send(f"woke {woke!r}, now {stamp!r}, reply {reply.at!r}")
        yield wait_for_reply()
        yield send(f"woke {woke!r}, now {stamp!r}, reply {reply.at!r}")

    await runner.start(london, "c1")
    clock.advance(timedelta(days=1))
    await runner.run_due()
    clock.advance(timedelta(hours=1))
    await runner.deliver("c1", "hi")  # with the cache on, every value in this message is warm
    async with Runner(runner.store, channel, clock=clock) as new_process:
        await new_process.deliver("c1", "again")  # a cold replay hands the dialog the recorded values
    first, second = channel.texts()
    assert first == second  # the reprs, time zones included, match between the warm run and the replay
    transcript = await runner.transcript("c1")
    assert transcript[0].at == START + timedelta(days=1, hours=1)


async def test_runner_tz_is_the_default_zone_of_new_conversations(store: Store, clock: VirtualClock) -> None:
    @dialog
    async def breakfast():
        yield sleep_until("tomorrow at 8am")

    async with Runner(store, clock=clock, tz="Asia/Tokyo") as runner:
        status = await runner.start(breakfast, "c1")
    assert status.wake_at == datetime(2026, 1, 5, 23, tzinfo=UTC)  # 08:00 JST on the 6th


@dialog
def runner_yes_no(question: str):
    """A plain sub-dialog: asks until it gets yes or no, returns a bool."""
    yield send(f"{question} (yes/no)")
    while True:
        reply = yield wait_for_reply()
        if reply.text in ("yes", "no"):
            return reply.text == "yes"
        yield send("Please say yes or no.")


async def test_sub_dialogs_across_replies_plain_inside_async_and_back(runner: Runner, channel: ListChannel) -> None:
    @dialog
    async def ask_name():
        yield send("Name?")
        reply = yield wait_for_reply()
        yield finish(reply.text)
        yield send("never sent")

    @dialog
    def onboarding():
        name = yield ask_name()
        likes = yield runner_yes_no(f"{name}, do you like dragons?")
        yield send("Great!" if likes else "Shame.")
        return {"name": name, "likes_dragons": likes}

    await runner.start(onboarding, "c1")
    for text in ("Ann", "maybe", "yes"):
        status = await runner.deliver("c1", text)
    assert (status.state, status.result) == ("completed", {"name": "Ann", "likes_dragons": True})
    assert channel.texts() == ["Name?", "Ann, do you like dragons? (yes/no)", "Please say yes or no.", "Great!"]


# -- status ------------------------------------------------------------------------


async def test_status_reports_each_state(runner: Runner, clock: VirtualClock) -> None:
    @dialog
    async def lifecycle():
        yield wait_for_reply()
        yield sleep("1 hour")
        reply = yield wait_for_reply()
        if reply.text == "fail":
            raise ValueError("asked to fail")
        yield finish({"ok": True})

    waiting = await runner.start(lifecycle, "good")
    assert (waiting.state, waiting.wake_at) == ("waiting_for_reply", None)
    sleeping = await runner.deliver("good", "hi")
    assert (sleeping.state, sleeping.wake_at) == ("sleeping", START + timedelta(hours=1))
    clock.advance(timedelta(hours=1))
    await runner.run_due()
    assert (await runner.status("good")).state == "waiting_for_reply"
    completed = await runner.deliver("good", "done")
    assert (completed.state, completed.result, completed.error) == ("completed", {"ok": True}, None)

    await runner.start(lifecycle, "bad")
    await runner.deliver("bad", "hi")
    clock.advance(timedelta(hours=1))
    await runner.run_due()
    failed = await runner.deliver("bad", "fail")
    assert failed.state == "failed"
    assert failed.error is not None
    assert "ValueError" in failed.error
    assert "asked to fail" in failed.error
    assert await runner.status("bad") == failed


# -- runs of one conversation -------------------------------------------------------


async def test_starting_a_live_conversation_again_is_an_error(runner: Runner) -> None:
    @dialog
    async def waits():
        yield wait_for_reply()

    await runner.start(waits, "c1")
    with pytest.raises(ConversationExistsError) as raised:
        await runner.start(waits, "c1")
    assert raised.value.conversation_id == "c1"
    assert "waiting_for_reply" in str(raised.value)


async def test_starting_an_ended_conversation_again_keeps_its_log(runner: Runner, channel: ListChannel) -> None:
    @dialog
    async def ask(question: str):
        yield send(question)
        reply = yield wait_for_reply()
        yield finish(reply.text)

    await runner.start(ask, "c1", "Tea?")
    first = await runner.deliver("c1", "yes")
    assert (first.state, first.result, first.run) == ("completed", "yes", 1)
    with pytest.raises(ConversationEndedError):
        await runner.deliver("c1", "hello?")

    second = await runner.start(ask, "c1", "Coffee?")
    assert (second.state, second.run) == ("waiting_for_reply", 2)
    assert second.last_seq > first.last_seq
    done = await runner.deliver("c1", "no")
    assert (done.state, done.result, done.run) == ("completed", "no", 2)

    transcript = await runner.transcript("c1")
    assert [(entry.direction, entry.text) for entry in transcript] == [
        ("out", "Tea?"),
        ("in", "yes"),
        ("out", "Coffee?"),
        ("in", "no"),
    ]
    ids = [entry.id for entry in transcript] + [message.id for message in channel.messages]
    assert len(set(ids)) == 4  # every message has its own id, and the channel saw the same ones
    assert [message.id for message in channel.messages] == [transcript[0].id, transcript[2].id]


async def test_a_failed_conversation_can_be_started_again(runner: Runner, channel: ListChannel) -> None:
    @dialog
    async def moody(fail: bool):
        yield send("hello")
        if fail:
            raise RuntimeError("bad mood")
        yield wait_for_reply()

    failed = await runner.start(moody, "c1", True)
    assert failed.state == "failed"
    again = await runner.start(moody, "c1", False)
    assert (again.state, again.run, again.error) == ("waiting_for_reply", 2, None)
    assert channel.texts() == ["hello", "hello"]
    assert len({message.id for message in channel.messages}) == 2


async def test_deliver_to_an_ended_conversation_raises(runner: Runner) -> None:
    @dialog
    async def one_shot():
        yield send("bye")

    status = await runner.start(one_shot, "c1")
    assert status.state == "completed"
    with pytest.raises(ConversationEndedError) as raised:
        await runner.deliver("c1", "wait!")
    assert raised.value.conversation_id == "c1"
    assert [text for _, text in await texts(runner, "c1")] == ["bye"]


async def test_registering_a_dialog_name_again_replaces_it(runner: Runner, channel: ListChannel) -> None:
    @dialog(name="runner-test-greeter")
    async def old_greeter():
        yield send("old")

    @dialog(name="runner-test-greeter")
    async def new_greeter():
        yield send("new")

    await runner.start("runner-test-greeter", "by-name")
    await runner.start(old_greeter, "by-object")  # the same name: the newest definition runs
    assert channel.texts() == ["new", "new"]


# -- stores and runners ------------------------------------------------------------


async def test_two_runners_share_one_store_object(store: Store, clock: VirtualClock, cache_size: int) -> None:
    @dialog
    async def relay():
        reply = yield wait_for_reply()
        yield send(f"Got {reply.text}")
        reply = yield wait_for_reply()
        yield send(f"Got {reply.text}")

    first_channel, second_channel = ListChannel(), ListChannel()
    async with (
        Runner(store, first_channel, clock=clock, cache_size=cache_size) as first,
        Runner(store, second_channel, clock=clock, cache_size=cache_size) as second,
    ):
        await first.start(relay, "c1")
        await second.deliver("c1", "one")
        await first.deliver("c1", "two")
        assert second_channel.texts() == ["Got one"]
        assert first_channel.texts() == ["Got two"]
        assert (await second.status("c1")).state == "completed"


async def test_runner_never_closes_the_store_it_was_given(store: Store, clock: VirtualClock) -> None:
    @dialog
    async def hello():
        yield send("hello")

    async with Runner(store, clock=clock) as runner:
        await runner.start(hello, "c1")
    async with Runner(store, clock=clock) as runner:
        assert [text for _, text in await texts(runner, "c1")] == ["hello"]
    row = await store.get("c1")
    assert row is not None
    assert row.state == "completed"


async def test_each_memory_store_is_new_and_empty(clock: VirtualClock) -> None:
    @dialog
    async def hello():
        yield send("hello")

    first = await open_store("memory://")
    second = await open_store("memory://")
    async with Runner(first, clock=clock) as runner:
        await runner.start(hello, "c1")
    assert await first.get("c1") is not None
    assert await second.get("c1") is None
    assert await second.conversations() == []


# -- serve -------------------------------------------------------------------------


class WatchedChannel(ListChannel):
    """A ListChannel a test can wait on until it holds ``count`` messages."""

    def __init__(self) -> None:
        super().__init__()
        self._arrived = anyio.Event()

    async def deliver(self, message: Message) -> None:
        await super().deliver(message)
        self._arrived.set()

    async def wait_for(self, count: int) -> None:
        while len(self.messages) < count:
            self._arrived = anyio.Event()
            await self._arrived.wait()


async def test_serve_fires_timers_as_the_virtual_clock_moves(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    @dialog
    async def alarm():
        yield send("Alarm set.")
        yield sleep("1 hour")
        yield send("Wake up!")
        yield sleep("1 day")
        yield send("Another day.")

    channel = WatchedChannel()
    # A poll interval far beyond the guard: only the clock's wake-up can make serve() fire in time.
    async with Runner(store, channel, clock=clock, cache_size=cache_size, poll_interval=3600) as runner:
        await runner.start(alarm, "c1")
        async with anyio.create_task_group() as group:
            group.start_soon(runner.serve)
            for expected, step in ((2, timedelta(hours=1)), (3, timedelta(days=1))):
                await anyio.wait_all_tasks_blocked()
                clock.advance(step)
                with anyio.fail_after(5):
                    await channel.wait_for(expected)
            group.cancel_scope.cancel()
    assert channel.texts() == ["Alarm set.", "Wake up!", "Another day."]
    assert (await runner.status("c1")).state == "completed"


# -- nondeterminism ------------------------------------------------------------------


def _define_quiz(first_line: str) -> None:
    """(Re)register the dialog "runner-test-quiz", as a new deploy of changed code would."""

    @dialog(name="runner-test-quiz")
    async def quiz():
        yield send(first_line)
        reply = yield wait_for_reply()
        yield send(f"Answer 1: {reply.text}")
        reply = yield wait_for_reply()
        yield send(f"Answer 2: {reply.text}")


@pytest.mark.parametrize("resume", ["retry", "deliver"])
async def test_changed_code_parks_the_conversation_and_the_fixed_code_resumes_it(
    store: Store, clock: VirtualClock, cache_size: int, resume: str
) -> None:
    _define_quiz("Question time!")
    async with Runner(store, clock=clock, cache_size=cache_size) as old_process:
        await old_process.start("runner-test-quiz", "c1")
        await old_process.deliver("c1", "first")

    _define_quiz("Quiz time!")  # a deploy changed a line the log already holds
    channel = ListChannel()
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        before = len(await store.load("c1"))
        with pytest.raises(NondeterminismError) as raised:
            await runner.deliver("c1", "second")
        assert (raised.value.conversation_id, raised.value.seq) == ("c1", 2)
        assert "send('Question time!')" in str(raised.value)
        assert "send('Quiz time!')" in str(raised.value)

        status = await runner.status("c1")
        assert status.state == "failed"
        assert status.error is not None
        assert "NondeterminismError" in status.error
        assert len(await store.load("c1")) == before + 1  # the reply, and nothing else
        assert ("in", "second") in await texts(runner, "c1")
        assert channel.texts() == []

        await runner.run_due()  # a parked conversation is not due work
        with pytest.raises(NondeterminismError):  # still the broken code: still parked
            await runner.retry("c1")
        assert (await runner.status("c1")).state == "failed"

        _define_quiz("Question time!")  # the fix is deployed
        if resume == "retry":
            resumed = await runner.retry("c1")
            assert resumed.state == "completed"
        else:
            resumed = await runner.deliver("c1", "third")
            assert resumed.state == "completed"
        assert channel.texts() == ["Answer 2: second"]
        assert (await runner.status("c1")).error is None
