"""Bad input gets a clear error, never a crash of the runner, and loses nothing acknowledged.

Each test first makes a reply durable, then feeds the bad input, then checks
that the error is the documented ``DynapromptError`` subclass and that the
transcript still holds every earlier reply.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import dynaprompt.errors
from dynaprompt import (
    ConversationError,
    CorruptEventError,
    DynapromptError,
    InvalidInputError,
    ListChannel,
    MessageTooLargeError,
    NotJSONError,
    NotTextError,
    Runner,
    Store,
    TimeParseError,
    UnknownConversationError,
    UnknownDialogError,
    UnknownTimeZoneError,
    call,
    dialog,
    finish,
    now,
    open_store,
    send,
    sleep,
    sleep_until,
    wait_for_reply,
)
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[1024, 0], ids=["cache", "no-cache"])
def cache_size(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
async def runner(store: Store, channel: ListChannel, clock: VirtualClock, cache_size: int) -> AsyncIterator[Runner]:
    async with Runner(store, channel, clock=clock, cache_size=cache_size, max_message_chars=20) as opened:
        yield opened


@dialog
async def echo():
    while True:
        reply = yield wait_for_reply()
        yield send(f"echo {reply.text}")


async def replies(runner: Runner, conversation_id: str) -> list[str]:
    return [entry.text for entry in await runner.transcript(conversation_id) if entry.direction == "in"]


async def test_unknown_conversation_is_a_clear_error(runner: Runner) -> None:
    await runner.start(echo, "known")
    await runner.deliver("known", "hello")
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: runner.deliver("nobody", "hi"),
        lambda: runner.status("nobody"),
        lambda: runner.transcript("nobody"),
        lambda: runner.retry("nobody"),
    ]
    for attempt in attempts:
        with pytest.raises(UnknownConversationError) as raised:
            await attempt()
        assert raised.value.conversation_id == "nobody"
        assert "'nobody'" in str(raised.value)
    assert await replies(runner, "known") == ["hello"]


@pytest.mark.parametrize("text", [42, None, b"bytes", ["a"]])
async def test_non_string_text_is_refused(runner: Runner, text: Any) -> None:
    await runner.start(echo, "c1")
    await runner.deliver("c1", "hello")
    with pytest.raises(NotTextError, match=f"must be a str, not {type(text).__name__}"):
        await runner.deliver("c1", text)
    assert await replies(runner, "c1") == ["hello"]
    assert (await runner.status("c1")).state == "waiting_for_reply"


async def test_oversized_text_is_refused_at_the_configured_limit(runner: Runner, channel: ListChannel) -> None:
    await runner.start(echo, "c1")
    await runner.deliver("c1", "x" * 20)  # exactly the limit is fine
    with pytest.raises(MessageTooLargeError) as raised:
        await runner.deliver("c1", "x" * 21)
    assert (raised.value.size, raised.value.limit) == (21, 20)
    assert "21" in str(raised.value)
    assert "20" in str(raised.value)
    assert await replies(runner, "c1") == ["x" * 20]
    assert channel.texts() == ["echo " + "x" * 20]


async def test_non_json_metadata_is_refused(runner: Runner) -> None:
    await runner.start(echo, "c1")
    await runner.deliver("c1", "hello", metadata={"source": "sms"})
    with pytest.raises(NotJSONError):
        await runner.deliver("c1", "hi", metadata={"when": object()})
    with pytest.raises(InvalidInputError, match="takes a dict, not list"):  # an AssertionError once
        await runner.deliver("c1", "hi", metadata=["sms"])  # type: ignore[arg-type]
    transcript = await runner.transcript("c1")
    assert [(entry.text, entry.metadata) for entry in transcript if entry.direction == "in"] == [
        ("hello", {"source": "sms"})
    ]


async def test_dialog_arguments_that_are_not_json_are_refused_and_nothing_is_stored(runner: Runner) -> None:
    @dialog
    async def greet(name: Any, **options: Any):
        yield send(f"Hi {name}")

    with pytest.raises(NotJSONError, match="must be JSON-compatible"):
        await runner.start(greet, "c1", object())
    with pytest.raises(NotJSONError, match="keyword arguments"):
        await runner.start(greet, "c2", "Ann", when={1, 2})
    for conversation_id in ("c1", "c2"):
        with pytest.raises(UnknownConversationError):
            await runner.status(conversation_id)
    status = await runner.start(greet, "c1", "Ann", when=[1, 2])  # the id is still free
    assert status.state == "completed"


async def test_unparseable_time_raises_inside_the_dialog_where_it_can_be_caught(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    @dialog
    async def reminder():
        while True:
            reply = yield wait_for_reply()
            try:
                yield send("Reminder!", at=reply.text)
            except TimeParseError as exc:
                yield send(f"Sorry, I did not get {exc.text!r}.")
            else:
                yield send("Reminder set.")

    await runner.start(reminder, "c1")
    await runner.deliver("c1", "whenever-ish")
    await runner.deliver("c1", "in 1 hour")
    assert channel.texts() == ["Sorry, I did not get 'whenever-ish'.", "Reminder set."]
    clock.advance(3600)
    await runner.run_due()
    assert channel.texts()[-1] == "Reminder!"
    assert await replies(runner, "c1") == ["whenever-ish", "in 1 hour"]


async def test_uncaught_time_parse_error_fails_the_conversation_naming_it(runner: Runner) -> None:
    @dialog
    async def naive():
        reply = yield wait_for_reply()
        yield sleep_until(reply.text)

    await runner.start(naive, "c1")
    status = await runner.deliver("c1", "the twelfth of never")
    assert status.state == "failed"
    assert status.error is not None
    assert "TimeParseError" in status.error
    assert "the twelfth of never" in status.error
    assert await replies(runner, "c1") == ["the twelfth of never"]


async def test_an_effect_given_a_bad_value_fails_only_its_conversation_naming_it(
    runner: Runner, channel: ListChannel
) -> None:
    """``send(to=5)`` in a dialog is the dialog's mistake: ``InvalidInputError`` at that ``yield`` (catchable
    there), and if uncaught its conversation fails naming the effect and the argument; others go on."""

    @dialog
    async def addressed():
        reply = yield wait_for_reply()
        try:
            yield send("hi", to=int(reply.text))  # type: ignore[arg-type]
        except InvalidInputError:
            yield send("caught")
        yield send("again", to=int(reply.text))  # type: ignore[arg-type]

    await runner.start(addressed, "bad")
    await runner.start(echo, "good")
    status = await runner.deliver("bad", "5")
    assert status.state == "failed"
    assert status.error is not None
    assert status.error.startswith("InvalidInputError: send(): to=5")
    assert channel.texts("bad") == ["caught"]
    assert await replies(runner, "bad") == ["5"]
    await runner.deliver("good", "hello")
    assert channel.texts("good") == ["echo hello"]


async def test_unknown_time_zone_is_a_clear_error(store: Store, clock: VirtualClock) -> None:
    with pytest.raises(UnknownTimeZoneError, match="Mars/Olympus_Mons"):
        Runner(store, clock=clock, tz="Mars/Olympus_Mons")


async def test_unknown_dialog_name_is_a_clear_error(runner: Runner) -> None:
    with pytest.raises(UnknownDialogError, match="no-such-dialog"):
        await runner.start("no-such-dialog", "c1")
    with pytest.raises(UnknownConversationError):
        await runner.status("c1")


async def test_corrupt_event_in_sqlite_names_conversation_and_seq_and_loses_nothing(
    tmp_path: Path, clock: VirtualClock, cache_size: int
) -> None:
    url = f"sqlite:///{tmp_path}/bot.db"

    @dialog
    async def napper():
        yield sleep("1 hour")
        while True:
            reply = yield wait_for_reply()
            yield send(f"echo {reply.text}")

    store = await open_store(url)
    try:
        async with Runner(store, clock=clock, cache_size=cache_size) as runner:
            await runner.start(napper, "broken")
            await runner.start(napper, "healthy")
            await runner.deliver("broken", "one")

        database = sqlite3.connect(f"{tmp_path}/bot.db", isolation_level=None)
        (body,) = database.execute("SELECT body FROM events WHERE conversation_id = 'broken' AND seq = 2").fetchone()
        database.execute("UPDATE events SET body = '{garbage' WHERE conversation_id = 'broken' AND seq = 2")

        channel = ListChannel()
        async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
            with pytest.raises(CorruptEventError) as raised:
                await runner.deliver("broken", "two")
            assert (raised.value.conversation_id, raised.value.seq) == ("broken", 2)
            assert "'broken'" in str(raised.value)
            assert "seq 2" in str(raised.value)
            with pytest.raises(CorruptEventError):
                await runner.transcript("broken")

            clock.advance(7200)
            await runner.run_due()  # the corrupt conversation does not stop the others
            assert (await runner.status("healthy")).state == "waiting_for_reply"
            assert (await runner.status("broken")).state == "sleeping"

            database.execute("UPDATE events SET body = ? WHERE conversation_id = 'broken' AND seq = 2", (body,))
            database.close()
            assert await replies(runner, "broken") == ["one"]  # the refused "two" was never acknowledged
            await runner.run_due()
            await runner.deliver("broken", "three")
            assert channel.texts("broken") == ["echo one", "echo three"]
    finally:
        await store.close()


async def test_every_error_the_library_defines_is_a_dynaprompt_error() -> None:
    names = dynaprompt.errors.__all__
    assert len(names) >= 19
    for name in names:
        error_type = getattr(dynaprompt.errors, name)
        assert issubclass(error_type, DynapromptError), name
    assert issubclass(NotTextError, InvalidInputError)
    assert issubclass(MessageTooLargeError, InvalidInputError)
    assert issubclass(NotJSONError, InvalidInputError)
    assert issubclass(UnknownConversationError, ConversationError)
    assert issubclass(CorruptEventError, dynaprompt.errors.StoreError)


async def test_the_sqlite_log_holds_json_only(tmp_path: Path, clock: VirtualClock) -> None:
    def lookup_weather() -> dict[str, object]:
        return {"sky": "clear", "degrees": 21}

    @dialog
    async def everything():
        yield send("hi", at="in 1 minute")
        yield call(lookup_weather)
        yield now()
        reply = yield wait_for_reply(timeout=60)
        yield finish(reply.text if reply else None)

    store = await open_store(f"sqlite:///{tmp_path}/bot.db")
    try:
        async with Runner(store, clock=clock) as runner:
            await runner.start(everything, "c1")
            await runner.deliver("c1", "done", metadata={"via": "sms"})
    finally:
        await store.close()
    database = sqlite3.connect(f"{tmp_path}/bot.db")
    bodies = [body for (body,) in database.execute("SELECT body FROM events ORDER BY seq")]
    database.close()
    decoded = [json.loads(body) for body in bodies]  # plain JSON: no pickle, no code
    assert [event["seq"] for event in decoded] == list(range(1, len(decoded) + 1))
    kinds = {event["kind"] for event in decoded}
    assert {"started", "sent", "called", "now", "waiting", "reply", "completed"} <= kinds
    called = next(event for event in decoded if event["kind"] == "called")
    assert called["result"] == {"sky": "clear", "degrees": 21}
