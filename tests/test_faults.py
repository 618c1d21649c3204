"""Faults stay local: a failing dialog, a failing call, a failing channel.

On both embedded stores, with the cache on and off.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dynaprompt import (
    CallError,
    ConversationEndedError,
    ListChannel,
    Message,
    Runner,
    Store,
    call,
    dialog,
    send,
    sleep,
    wait_for_reply,
)
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@dialog
async def fragile():
    """Raises on the reply "boom", echoes anything else."""
    while True:
        reply = yield wait_for_reply()
        if reply.text == "boom":
            raise RuntimeError("the dialog broke")
        yield send(f"echo {reply.text}")


async def test_a_raising_dialog_fails_only_its_own_conversation(runner: Runner, channel: ListChannel) -> None:
    await runner.start(fragile, "bad")
    await runner.start(fragile, "good")
    await runner.deliver("good", "one")

    failed = await runner.deliver("bad", "boom")
    assert failed.state == "failed"
    assert failed.error is not None
    assert "RuntimeError" in failed.error
    assert "the dialog broke" in failed.error
    with pytest.raises(ConversationEndedError):
        await runner.deliver("bad", "hello?")

    still = await runner.deliver("good", "two")
    assert still.state == "waiting_for_reply"
    assert channel.texts("good") == ["echo one", "echo two"]
    assert channel.texts("bad") == []
    assert [entry.text for entry in await runner.transcript("bad")] == ["boom"]


async def test_run_due_keeps_going_past_a_failing_conversation(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def timed(should_fail: bool):
        yield sleep("1 hour")
        if should_fail:
            raise KeyError("missing")
        yield send("on time")

    # The failing one falls due first, so run_due meets it before the others.
    await runner.start(timed, "fails", True)
    clock.advance(1)
    await runner.start(timed, "works-1", False)
    await runner.start(timed, "works-2", False)
    clock.advance(timedelta(hours=2))
    advanced = await runner.run_due()
    assert advanced == 3
    assert channel.texts("works-1") == ["on time"]
    assert channel.texts("works-2") == ["on time"]
    status = await runner.status("fails")
    assert status.state == "failed"
    assert status.error is not None
    assert "KeyError" in status.error


async def test_run_due_keeps_going_past_a_conversation_whose_code_changed(
    store: Store, channel: ListChannel, clock: VirtualClock, cache_size: int
) -> None:
    def define(first_line: str) -> None:
        @dialog(name="faults-test-changing")
        async def changing():
            yield send(first_line)
            yield sleep("1 hour")
            yield send("later")

    @dialog
    async def steady():
        yield sleep("1 hour")
        yield send("steady")

    define("v1")
    async with Runner(store, clock=clock) as old_process:
        await old_process.start("faults-test-changing", "changed")
        clock.advance(1)
        await old_process.start(steady, "steady")
    define("v2")
    clock.advance(timedelta(hours=2))
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.run_due()
        assert channel.texts("steady") == ["steady"]
        assert channel.texts("changed") == []
        status = await runner.status("changed")
        assert status.state == "failed"
        assert status.error is not None
        assert "NondeterminismError" in status.error


async def test_failing_call_is_retried_then_raises_call_error_inside_the_dialog(
    runner: Runner, channel: ListChannel
) -> None:
    attempts: list[int] = []

    def unreliable() -> str:
        attempts.append(1)
        raise ConnectionError("service down")

    @dialog
    async def fetcher():
        try:
            value = yield call(unreliable).with_retries(2, delay=0)
        except CallError as exc:
            value = f"gave up: {exc}"
        yield send(value)
        yield wait_for_reply()
        yield send("still here")

    await runner.start(fetcher, "c1")
    await runner.deliver("c1", "hi")
    assert len(attempts) == 3  # one try and two retries, and never again on replay
    assert channel.texts() == ["gave up: ConnectionError: service down", "still here"]


async def test_call_that_succeeds_on_a_retry_records_its_result(runner: Runner, channel: ListChannel) -> None:
    attempts: list[int] = []

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) < 2:
            raise TimeoutError("slow")
        return 7

    @dialog
    async def fetcher():
        value = yield call(flaky).with_retries(3, delay=0)
        yield wait_for_reply()
        yield send(f"value {value}")

    await runner.start(fetcher, "c1")
    await runner.deliver("c1", "hi")
    assert len(attempts) == 2
    assert channel.texts() == ["value 7"]


class FlakyChannel(ListChannel):
    """Refuses the messages whose text is in ``refuse``, once each; remembers every attempt."""

    def __init__(self, *refuse: str) -> None:
        super().__init__()
        self.refuse = set(refuse)
        self.attempts: list[str] = []

    async def deliver(self, message: Message) -> None:
        self.attempts.append(message.id)
        if message.text in self.refuse:
            self.refuse.discard(message.text)
            raise ConnectionError("channel down")
        await super().deliver(message)


async def test_refused_message_stays_queued_and_is_redelivered_with_the_same_id(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    @dialog
    async def talker():
        yield send("one")
        yield send("two")
        yield send("three")
        reply = yield wait_for_reply()
        yield send(f"got {reply.text}")

    channel = FlakyChannel("two")
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        status = await runner.start(talker, "c1")
        assert status.state == "waiting_for_reply"
        assert channel.texts() == ["one"]  # "two" was refused, "three" waits behind it
        assert channel.attempts == ["c1:2", "c1:3"]

        await runner.run_due()
        assert channel.texts() == ["one", "two", "three"]
        assert channel.attempts == ["c1:2", "c1:3", "c1:3", "c1:4"]
        assert [message.id for message in channel.messages] == ["c1:2", "c1:3", "c1:4"]

        await runner.run_due()  # nothing is handed over twice once it was accepted
        await runner.deliver("c1", "hi")
        assert channel.texts() == ["one", "two", "three", "got hi"]
        assert [entry.text for entry in await runner.transcript("c1")] == ["one", "two", "three", "hi", "got hi"]


async def test_last_message_of_an_ended_conversation_is_redelivered(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    @dialog
    async def goodbye():
        yield send("bye")

    channel = FlakyChannel("bye")
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        assert (await runner.start(goodbye, "c1")).state == "completed"
        assert channel.texts() == []
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.run_due()
        assert channel.texts() == ["bye"]
        assert channel.attempts == ["c1:2", "c1:2"]
        assert (await runner.status("c1")).state == "completed"


async def test_refused_scheduled_message_is_not_in_the_transcript_until_delivered(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    @dialog
    async def reminder():
        yield send("Take your pills", at="in 1 hour")
        yield wait_for_reply()

    channel = FlakyChannel("Take your pills")
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(reminder, "c1")
        clock.advance(timedelta(hours=1))
        await runner.run_due()
        assert channel.texts() == []
        assert await runner.transcript("c1") == []
        clock.advance(timedelta(minutes=5))
        await runner.run_due()
        assert channel.texts() == ["Take your pills"]
        assert channel.attempts == ["c1:2", "c1:2"]
        (entry,) = await runner.transcript("c1")
        assert (entry.id, entry.at) == ("c1:2", START + timedelta(hours=1, minutes=5))


async def test_refused_reply_to_a_deliver_is_redelivered_and_the_inbound_message_is_kept(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    channel = FlakyChannel("echo hi")
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(fragile, "c1")
        status = await runner.deliver("c1", "hi")  # returns: the reply is durable though the answer was refused
        assert status.state == "waiting_for_reply"
        assert channel.texts() == []
        await runner.run_due()
        assert channel.texts() == ["echo hi"]
        assert [entry.text for entry in await runner.transcript("c1")] == ["hi", "echo hi"]


async def test_a_dialog_that_raises_at_once_fails_its_start_without_raising(runner: Runner) -> None:
    @dialog
    async def broken(name: str):
        yield send(name.upper())  # name is None: AttributeError

    status = await runner.start(broken, "c1", None)
    assert status.state == "failed"
    assert status.error is not None
    assert status.error.startswith("AttributeError")


class LogCheckingChannel(ListChannel):
    """Checks, as each message arrives, that the store already holds the send it came from."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.recorded_first: list[bool] = []

    async def deliver(self, message: Message) -> None:
        seq = int(message.id.rsplit(":", 1)[1])
        events = await self.store.load(message.conversation_id)
        self.recorded_first.append(any(event.seq == seq and event.kind == "sent" for event in events))
        await super().deliver(message)


async def test_a_send_is_recorded_before_it_is_handed_to_the_channel(
    store: Store, clock: VirtualClock, cache_size: int
) -> None:
    @dialog
    async def talker():
        yield send("now")
        yield send("later", at="in 1 minute")
        reply = yield wait_for_reply()
        yield send(f"got {reply.text}")

    channel = LogCheckingChannel(store)
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(talker, "c1")
        clock.advance(60)
        await runner.run_due()
        await runner.deliver("c1", "x")
    assert channel.texts() == ["now", "later", "got x"]
    assert channel.recorded_first == [True, True, True]
