"""The dragons example and its reusable blocks, on a Runner with a virtual clock, warm and cold."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from dynaprompt import ListChannel, Runner, Store
from dynaprompt.events import Called
from dynaprompt.loading import load_dialog, load_module
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
dragons = load_module(str(EXAMPLES / "dragons.py"))
blocks = load_module(str(EXAMPLES / "blocks.py"))
NUDGE = "Still there? No rush, I'll wait."


@pytest.fixture(params=[1024, 0], ids=["warm", "cold"])
def cache_size(request: pytest.FixtureRequest) -> int:
    """With the cache off, every step replays the conversation from its log, as after a restart."""
    return int(request.param)


async def talk(runner: Runner, channel: ListChannel, text: str) -> list[str]:
    before = len(channel.messages)
    await runner.deliver("u1", text)
    return channel.texts()[before:]


def test_the_file_serves_the_dragons_dialog() -> None:
    assert load_dialog(str(EXAMPLES / "dragons.py")).name == "dragons"


async def test_a_talk_about_dragons(store: Store, clock: VirtualClock, channel: ListChannel, cache_size: int) -> None:
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(dragons.main, "u1")
        assert channel.texts() == ["Hi, I'm Ember. What's your name?"]
        aside, question = await talk(runner, channel, "  Ann ")
        pet = re.fullmatch(r"Ann! My neighbour has a (\w+) called Ann\. It bites\.", aside)
        assert pet is not None
        assert pet.group(1) in dragons.PETS
        assert question == "Do you have a minute to talk, Ann?"
        assert await talk(runner, channel, "sure") == ["Just yes or no, please."]
        assert await talk(runner, channel, "YES") == ["What shall we talk about?\n1. dragons\n2. the weather"]
        assert await talk(runner, channel, "3") == ["Please pick a number from the list."]
        assert await talk(runner, channel, "1") == ["Which dragon is your favourite, real or legendary?"]
        assert await talk(runner, channel, "Smaug") == [
            "Smaug! A fine choice, Ann.",
            "Would you ride a dragon if one offered?",
        ]
        assert await talk(runner, channel, "y") == [
            "Brave! Bring a warm coat, it's chilly up there.",
            "What colour would yours be?\n1. red\n2. green\n3. gold",
        ]
        assert await talk(runner, channel, "Gold.") == [
            "A gold dragon. I can picture it already.",
            "That was lovely, Ann. Goodbye!",
        ]
        status = await runner.status("u1")
    assert (status.state, status.result) == ("completed", "dragons")
    draws = [event for event in await store.load("u1") if isinstance(event, Called)]
    assert [(event.name, event.result) for event in draws] == [("dragons:pick_pet", pet.group(1))]


async def test_saying_no_ends_politely(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(dragons.main, "u1")
        await talk(runner, channel, "Bo")
        assert await talk(runner, channel, "n") == ["Another time then. Goodbye, Bo!"]
        assert (await runner.status("u1")).result == "declined"


async def test_a_quiet_user_is_checked_on_once_after_ten_minutes(
    store: Store, clock: VirtualClock, channel: ListChannel, cache_size: int
) -> None:
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(dragons.main, "u1")
        clock.advance(timedelta(minutes=9, seconds=59))
        await runner.run_due()
        assert channel.texts() == ["Hi, I'm Ember. What's your name?"]
        clock.advance(timedelta(seconds=1))
        await runner.run_due()
        assert channel.texts()[1:] == [NUDGE]
        clock.advance(timedelta(days=2))  # once: after the nudge it waits as long as it takes
        await runner.run_due()
        assert channel.texts()[1:] == [NUDGE]
        assert (await talk(runner, channel, "Cy"))[1] == "Do you have a minute to talk, Cy?"
        clock.advance(timedelta(minutes=10))  # each question checks once
        await runner.run_due()
        assert channel.texts()[-1] == NUDGE


async def test_the_pet_is_drawn_once_and_a_cold_replay_sees_the_same_one(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(dragons.main, "u1")
        await talk(runner, channel, "Di")
    warm = [entry.text for entry in await Runner(store, clock=clock).transcript("u1")]
    cold_channel = ListChannel()
    async with Runner(store, cold_channel, clock=clock, cache_size=0) as cold:
        assert await talk(cold, cold_channel, "yes") == ["What shall we talk about?\n1. dragons\n2. the weather"]
        transcript = [entry.text for entry in await cold.transcript("u1")]
    assert transcript[: len(warm)] == warm
    assert len([event for event in await store.load("u1") if isinstance(event, Called)]) == 1


async def test_blocks_work_as_sub_dialogs_of_any_dialog(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    from dynaprompt import dialog, finish

    @dialog(name="test_dragons.quiz")
    async def quiz():
        name = yield blocks.prompt("Name?")
        fly = yield blocks.yes_no("Can dragons fly?", "y or n")
        pick = yield blocks.multichoice("Best?", "Number please.", ["a", "b"])
        yield finish([name, fly, pick])

    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(quiz, "u1")
        for text in ("Ed", "maybe", "no", "B"):
            await runner.deliver("u1", text)
        status = await runner.status("u1")
    assert status.result == ["Ed", False, "b"]
    assert channel.texts() == ["Name?", "Can dragons fly?", "y or n", "Best?\n1. a\n2. b"]


@pytest.mark.slow
def test_dragons_runs_under_chat(tmp_path: Path) -> None:
    import subprocess
    import sys

    chat = subprocess.run(
        [sys.executable, "-m", "dynaprompt.cli", "chat", str(EXAMPLES / "dragons.py"), "--store",
         f"sqlite:///{tmp_path}/chat.db"],
        input="Flo\nno\n", capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    bot = [line.removeprefix("bot> ") for line in chat.stdout.splitlines() if line.startswith("bot> ")]
    assert bot[0] == "Hi, I'm Ember. What's your name?"
    assert bot[2:] == ["Do you have a minute to talk, Flo?", "Another time then. Goodbye, Flo!"]
