"""The pure replay engine, stepped by hand: no store, no clock, no runner.

Each test drives an :class:`Execution` with ``advance()``, ``input_reply()`` and
``record_call()``, keeps the events it returns as "the log", and then replays
that log in a fresh execution, which must produce nothing new and end in the
same place.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dynaprompt import (
    CallError,
    NondeterminismError,
    NotJSONError,
    TimeParseError,
    UnknownTimeZoneError,
    call,
    dialog,
    finish,
    now,
    send,
    set_timezone,
    sleep,
    sleep_until,
    wait_for_reply,
)
from dynaprompt.dialogs import Dialog
from dynaprompt.events import Called, EffectFailed, Event, Sent, Started, SubEnded, SubStarted
from dynaprompt.replay import Advance, Execution

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


class Log:
    """A conversation driven by hand: the execution plus every event it asked to append."""

    def __init__(self, chosen: Dialog, *args: Any, conversation_id: str = "c1", **kwargs: Any) -> None:
        self.dialog = chosen
        self.conversation_id = conversation_id
        started = Started(seq=1, at=T0, dialog=chosen.name, args=list(args), kwargs=kwargs)
        self.events: list[Event] = [started]
        self.execution = Execution.begin(conversation_id, chosen, started)

    async def advance(self, at: datetime = T0) -> Advance:
        """Advance, running any ``call()`` it hands out the way a runner would, and keep the events."""
        outcome = await self.execution.advance(at)
        self.events += outcome.events
        while outcome.call is not None:
            effect = outcome.call
            try:
                result, error = effect.fn(*effect.arguments, **effect.keywords), None
            except Exception as exc:
                result, error = None, exc
            self.execution.record_call(result, error, at)
            outcome = await self.execution.advance(at)
            self.events += outcome.events
        return outcome

    async def reply(self, text: str, at: datetime = T0) -> Advance:
        self.execution.input_reply(text, {}, at)
        return await self.advance(at)

    def texts(self) -> list[str]:
        return [event.text for event in self.events if isinstance(event, Sent)]

    async def replay(self, at: datetime = T0, chosen: Dialog | None = None) -> tuple[Execution, Advance]:
        """A fresh execution fed the whole log, advanced once (as after a cold load)."""
        started = self.events[0]
        assert isinstance(started, Started)
        execution = Execution.begin(self.conversation_id, chosen or self.dialog, started)
        execution.extend(self.events[1:])
        return execution, await execution.advance(at)


async def test_replay_of_a_recorded_log_yields_no_new_events_and_the_same_result() -> None:
    @dialog
    async def check_in(name: str):
        yield send(f"Hi {name}! How did you sleep?")
        reply = yield wait_for_reply()
        stamp = yield now()
        yield sleep("1 hour")
        yield send(f"Noted {reply.text!r} at {stamp.isoformat()}.")
        yield finish({"answer": reply.text})

    convo = Log(check_in, "Ann")
    first = await convo.advance()
    assert first.state == "waiting_for_reply"
    _, replayed = await convo.replay(T0 + timedelta(minutes=5))
    assert (replayed.events, replayed.state) == ([], "waiting_for_reply")

    sleeping = await convo.reply("Well", T0 + timedelta(minutes=1))
    assert (sleeping.state, sleeping.wake_at) == ("sleeping", T0 + timedelta(hours=1, minutes=1))
    done = await convo.advance(T0 + timedelta(hours=2))
    assert (done.state, done.result) == ("completed", {"answer": "Well"})
    noted = f"Noted 'Well' at {(T0 + timedelta(minutes=1)).isoformat()}."
    assert convo.texts() == ["Hi Ann! How did you sleep?", noted]

    # Days later, the recorded now() and the recorded wake-up are what replay sees.
    execution, replayed = await convo.replay(T0 + timedelta(days=3))
    assert replayed.events == []
    assert (replayed.state, replayed.result) == ("completed", {"answer": "Well"})
    assert execution.last_seq == convo.events[-1].seq


async def test_changed_code_raises_nondeterminism_naming_conversation_seq_and_both_effects() -> None:
    @dialog
    async def greeting_v1():
        yield send("Hi")
        yield wait_for_reply()

    @dialog
    async def greeting_v2():
        yield send("Hello")
        yield wait_for_reply()

    convo = Log(greeting_v1, conversation_id="ann")
    await convo.advance()
    with pytest.raises(NondeterminismError) as raised:
        await convo.replay(chosen=greeting_v2)
    error = raised.value
    assert (error.conversation_id, error.seq) == ("ann", 2)
    assert error.recorded == "send('Hi')"
    assert error.yielded == "send('Hello')"
    assert "'ann'" in str(error)
    assert "seq 2" in str(error)
    assert "send('Hi')" in str(error)
    assert "send('Hello')" in str(error)


async def test_dialog_that_stops_early_on_replay_is_nondeterministic() -> None:
    @dialog
    async def long_one():
        yield send("one")
        yield send("two")

    @dialog
    async def short_one():
        yield send("one")

    convo = Log(long_one)
    await convo.advance()
    with pytest.raises(NondeterminismError) as raised:
        await convo.replay(chosen=short_one)
    assert raised.value.seq == 3
    assert "send('two')" in str(raised.value)


@dialog
def yes_no(question: str):
    """A plain generator sub-dialog that returns its answer."""
    yield send(f"{question} (yes/no)")
    while True:
        reply = yield wait_for_reply()
        if reply.text.lower() in ("yes", "no"):
            return reply.text.lower() == "yes"
        yield send("Please answer yes or no.")


@dialog
async def ask_name():
    """An async sub-dialog that ends with finish()."""
    yield send("What's your name?")
    reply = yield wait_for_reply()
    yield finish(reply.text)


async def test_async_dialog_calls_plain_sub_dialog_and_gets_its_return_value() -> None:
    @dialog
    async def dragons():
        likes = yield yes_no("Like dragons?")
        yield send("Me too!" if likes else "Fair enough.")

    convo = Log(dragons)
    await convo.advance()
    await convo.reply("maybe")
    done = await convo.reply("YES")
    assert done.state == "completed"
    assert convo.texts() == ["Like dragons? (yes/no)", "Please answer yes or no.", "Me too!"]
    kinds = [event.kind for event in convo.events]
    assert kinds[1] == "sub_started"
    assert "sub_ended" in kinds
    ended = next(event for event in convo.events if isinstance(event, SubEnded))
    assert ended.result is True
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.state) == ([], "completed")


async def test_plain_dialog_calls_async_sub_dialog() -> None:
    @dialog
    def welcome():
        name = yield ask_name()
        yield send(f"Welcome, {name}!")
        return name

    convo = Log(welcome)
    await convo.advance()
    done = await convo.reply("Ann")
    assert (done.state, done.result) == ("completed", "Ann")
    assert convo.texts() == ["What's your name?", "Welcome, Ann!"]
    started = next(event for event in convo.events if isinstance(event, SubStarted))
    assert started.dialog == ask_name.name
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.state, replayed.result) == ([], "completed", "Ann")


async def test_finish_in_a_sub_dialog_ends_only_the_sub_dialog() -> None:
    @dialog
    async def quick_answer():
        yield finish("yes")
        yield send("never said")

    @dialog
    async def parent():
        answer = yield quick_answer()
        yield send(f"The sub-dialog said {answer}.")
        yield finish("parent done")

    convo = Log(parent)
    done = await convo.advance()
    assert (done.state, done.result) == ("completed", "parent done")
    assert convo.texts() == ["The sub-dialog said yes."]


async def test_plain_generator_return_value_is_the_result() -> None:
    @dialog
    def adder(a: int, b: int):
        yield send("adding")
        return a + b

    convo = Log(adder, 2, 3)
    done = await convo.advance()
    assert (done.state, done.result) == ("completed", 5)
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.result) == ([], 5)


def _explode(city: str) -> str:
    raise ValueError(f"no weather for {city}")


async def test_call_error_is_raised_inside_the_dialog_warm_and_on_replay() -> None:
    @dialog
    async def weather():
        try:
            forecast = yield call(_explode, "Atlantis")
        except CallError as exc:
            forecast = f"unknown ({exc.type_name}: {exc.message})"
        yield send(f"Forecast: {forecast}")
        yield wait_for_reply()

    convo = Log(weather)
    warm = await convo.advance()
    assert warm.state == "waiting_for_reply"
    assert convo.texts() == ["Forecast: unknown (ValueError: no weather for Atlantis)"]
    called = next(event for event in convo.events if isinstance(event, Called))
    assert called.error is not None
    assert called.error.type == "ValueError"

    _, replayed = await convo.replay()
    assert replayed.call is None  # the recorded failure is reused, the function is not run again
    assert (replayed.events, replayed.state) == ([], "waiting_for_reply")


async def test_recorded_call_result_is_reused_on_replay_without_calling() -> None:
    runs: list[int] = []

    def roll() -> int:
        runs.append(1)
        return 4

    @dialog
    async def dice():
        value = yield call(roll)
        yield send(f"You rolled {value}.")

    convo = Log(dice)
    await convo.advance()
    assert convo.texts() == ["You rolled 4."]
    _, replayed = await convo.replay()
    assert (replayed.call, replayed.events, replayed.state) == (None, [], "completed")
    assert len(runs) == 1


async def test_time_parse_error_is_raised_at_that_yield_and_the_same_on_replay() -> None:
    @dialog
    async def nap():
        try:
            yield sleep_until("the twelfth of never")
        except TimeParseError as exc:
            yield send(f"Sorry: {exc} [{exc.text}]")
        try:
            yield wait_for_reply(timeout="soonish")
        except TimeParseError as exc:
            yield send(f"Sorry: {exc} [{exc.text}]")
        yield wait_for_reply()

    convo = Log(nap)
    warm = await convo.advance()
    assert warm.state == "waiting_for_reply"
    assert convo.texts() == [
        "Sorry: could not understand 'the twelfth of never' as a time [the twelfth of never]",
        "Sorry: could not understand 'soonish' as a duration [soonish]",
    ]
    failures = [event for event in convo.events if isinstance(event, EffectFailed)]
    assert [(f.effect, f.error.type) for f in failures] == [
        ("sleep_until", "TimeParseError"),
        ("wait_for_reply", "TimeParseError"),
    ]
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.state) == ([], "waiting_for_reply")


async def test_unknown_zone_in_set_timezone_is_catchable_and_the_same_on_replay() -> None:
    @dialog
    async def zoned():
        try:
            yield set_timezone("Mars/Olympus_Mons")
        except UnknownTimeZoneError as exc:
            yield send(f"Bad zone {exc.zone}")
        yield wait_for_reply()

    convo = Log(zoned)
    await convo.advance()
    assert convo.texts() == ["Bad zone Mars/Olympus_Mons"]
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.state) == ([], "waiting_for_reply")


async def test_sub_dialog_with_non_json_arguments_raises_not_json_inside_the_dialog_and_on_replay() -> None:
    @dialog
    async def echo(value: Any):
        yield send(str(value))

    @dialog
    async def caller():
        try:
            yield echo(object())
        except NotJSONError:
            yield send("that argument cannot be stored")
        yield wait_for_reply()

    convo = Log(caller)
    await convo.advance()
    assert convo.texts() == ["that argument cannot be stored"]
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.state) == ([], "waiting_for_reply")


async def test_replies_recorded_before_the_dialog_waits_are_consumed_in_order() -> None:
    @dialog
    async def collector():
        yield sleep("1 hour")
        texts = []
        for _ in range(3):
            reply = yield wait_for_reply()
            texts.append(reply.text)
        yield finish(texts)

    convo = Log(collector)
    await convo.advance()
    for text in ("a", "b", "c"):
        still = await convo.reply(text, T0 + timedelta(minutes=1))
        assert still.state == "sleeping"
    done = await convo.advance(T0 + timedelta(hours=1))
    assert (done.state, done.result) == ("completed", ["a", "b", "c"])
    _, replayed = await convo.replay(T0 + timedelta(hours=2))
    assert (replayed.events, replayed.result) == ([], ["a", "b", "c"])


async def test_wait_timeout_is_due_at_its_instant_not_before() -> None:
    @dialog
    async def patient():
        reply = yield wait_for_reply(timeout=60)
        yield finish("silence" if reply is None else reply.text)

    convo = Log(patient)
    waiting = await convo.advance()
    assert waiting.wake_at == T0 + timedelta(seconds=60)
    early = await convo.advance(T0 + timedelta(seconds=59, microseconds=999_999))
    assert (early.events, early.state) == ([], "waiting_for_reply")
    done = await convo.advance(T0 + timedelta(seconds=60))
    assert (done.state, done.result) == ("completed", "silence")
    _, replayed = await convo.replay(T0 + timedelta(days=1))
    assert (replayed.events, replayed.result) == ([], "silence")


async def test_error_raised_in_a_sub_dialog_reaches_the_parent_warm_and_on_replay() -> None:
    @dialog
    def strict_number():
        reply = yield wait_for_reply()
        return int(reply.text)

    @dialog
    async def asker():
        while True:
            try:
                number = yield strict_number()
            except ValueError:
                yield send("That is not a number.")
            else:
                yield finish(number)

    convo = Log(asker)
    await convo.advance()
    await convo.reply("seven")
    done = await convo.reply("7")
    assert (done.state, done.result) == ("completed", 7)
    assert convo.texts() == ["That is not a number."]
    ended = [event for event in convo.events if isinstance(event, SubEnded)]
    assert [e.error.type if e.error else e.result for e in ended] == ["ValueError", 7]
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.result) == ([], 7)


async def test_nested_sub_dialogs_each_end_only_themselves() -> None:
    @dialog
    async def innermost():
        yield finish("deep")
        yield send("never")

    @dialog
    def middle():
        value = yield innermost()
        yield send(f"middle got {value}")
        return f"{value}er"

    @dialog
    async def outer():
        value = yield middle()
        yield send(f"outer got {value}")

    convo = Log(outer)
    done = await convo.advance()
    assert done.state == "completed"
    assert convo.texts() == ["middle got deep", "outer got deeper"]
    assert [event.kind for event in convo.events].count("sub_started") == 2
    _, replayed = await convo.replay()
    assert (replayed.events, replayed.state) == ([], "completed")


async def test_call_with_a_result_that_is_not_json_raises_call_error_naming_it() -> None:
    @dialog
    async def bad_result():
        try:
            yield call(set, [1, 2])
        except CallError as exc:
            yield send(f"{exc.type_name}")
        yield wait_for_reply()

    convo = Log(bad_result)
    await convo.advance()
    assert convo.texts() == ["NotJSONError"]
    _, replayed = await convo.replay()
    assert (replayed.call, replayed.events, replayed.state) == (None, [], "waiting_for_reply")


async def test_queued_reply_beats_a_zero_timeout_and_no_reply_times_out_at_once() -> None:
    @dialog
    async def quick():
        yield sleep(10)
        first = yield wait_for_reply(timeout=0)
        second = yield wait_for_reply(timeout=0)
        yield finish([None if r is None else r.text for r in (first, second)])

    convo = Log(quick)
    await convo.advance()
    await convo.reply("early")
    done = await convo.advance(T0 + timedelta(seconds=10))
    assert (done.state, done.result) == ("completed", ["early", None])


async def test_yielding_something_that_is_not_an_effect_fails_the_dialog_with_a_clear_error() -> None:
    @dialog
    async def confused():
        yield "hello"

    convo = Log(confused)
    done = await convo.advance()
    assert done.state == "failed"
    assert done.error is not None
    assert done.error.type == "DynapromptError"
    assert "may only yield effects" in done.error.message
    assert "'hello'" in done.error.message


async def test_reply_recorded_after_an_overdue_timeout_queues_behind_it_and_replays_the_same() -> None:
    @dialog
    async def patient():
        first = yield wait_for_reply(timeout=60)
        second = yield wait_for_reply(timeout=60)
        yield finish([None if r is None else r.text for r in (first, second)])

    convo = Log(patient)
    await convo.advance()
    done = await convo.reply("late", T0 + timedelta(seconds=90))  # the first timeout was due at +60 s
    assert (done.state, done.result) == ("completed", [None, "late"])
    _, replayed = await convo.replay(T0 + timedelta(days=1))
    assert (replayed.events, replayed.result) == ([], [None, "late"])

    on_time = Log(patient)
    await on_time.advance()
    done = await on_time.reply("prompt", T0 + timedelta(seconds=59))
    assert done.state == "waiting_for_reply"
    done = await on_time.advance(T0 + timedelta(seconds=200))
    assert (done.state, done.result) == ("completed", ["prompt", None])
