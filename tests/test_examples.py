"""The guessbot example, played through a Runner on a virtual clock, on every embedded store, warm and cold."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from dynaprompt import ListChannel, Runner, Store
from dynaprompt.events import Called
from dynaprompt.loading import load_dialog, load_module
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

GUESSBOT = Path(__file__).resolve().parent.parent / "examples" / "guessbot.py"
guessbot = load_module(str(GUESSBOT))
ID = "player-1"


async def secrets(store: Store) -> list[int]:
    """The numbers the bot drew, as its log recorded them."""
    return [event.result for event in await store.load(ID) if isinstance(event, Called)]  # type: ignore[misc]


async def play_to_win(runner: Runner, channel: ListChannel, low: int = 1, high: int = 100) -> int:
    """Binary search on the bot's hints; returns how many guesses it took."""
    guesses = 0
    while True:
        guess = (low + high) // 2
        before = len(channel.messages)
        await runner.deliver(ID, str(guess))
        guesses += 1
        answer = channel.texts()[before]
        if answer.startswith("Higher"):
            low = guess + 1
        elif answer.startswith("Lower"):
            high = guess - 1
        else:
            assert answer.startswith(f"Yes, {guess}!")
            return guesses


async def test_main_is_the_dialog_chat_picks_from_the_file() -> None:
    assert load_dialog(str(GUESSBOT)).name == "guessbot"
    assert load_dialog(f"{GUESSBOT}:yes_no").name == "guessbot.yes_no"


async def test_a_game_is_won_by_binary_search_on_the_recorded_number(
    store: Store, clock: VirtualClock, channel: ListChannel, cache_size: int
) -> None:
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(guessbot.main, ID)
        guesses = await play_to_win(runner, channel)
        status = await runner.status(ID)
    [secret] = await secrets(store)
    tries = "try" if guesses == 1 else "tries"
    assert channel.texts()[:2] == [
        "Hi! Let's play guess the number.",
        "I'm thinking of a number between 1 and 100. What's your guess?",
    ]
    assert channel.texts()[-2:] == [f"Yes, {secret}! You got it in {guesses} {tries}.", "Another game? (yes/no)"]
    assert guesses <= 7  # binary search over 100 numbers
    assert status.state == "waiting_for_reply"


async def test_a_non_number_is_rejected_politely_and_not_counted(
    store: Store, clock: VirtualClock, channel: ListChannel, cache_size: int
) -> None:
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(guessbot.main, ID)
        await runner.deliver(ID, "fifty")
        assert channel.texts()[-1] == "'fifty' is not a whole number. Try something like 50."
        await runner.deliver(ID, "500")
        assert channel.texts()[-1] == "500 is out of range: pick a number between 1 and 100."
        [secret] = await secrets(store)
        await runner.deliver(ID, str(secret))
    assert channel.texts()[-2] == f"Yes, {secret}! You got it in 1 try."


async def test_a_silent_player_is_nudged_once_per_silence(
    store: Store, clock: VirtualClock, channel: ListChannel, cache_size: int
) -> None:
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(guessbot.main, ID, nudge_after=60)
        clock.advance(59)
        await runner.run_due()
        assert len(channel.texts()) == 2  # not yet
        clock.advance(1)
        await runner.run_due()
        nudge = "Still there? I'm still thinking of a number between 1 and 100."
        assert channel.texts()[-1] == nudge
        clock.advance(timedelta(days=2))
        await runner.run_due()
        assert channel.texts().count(nudge) == 1  # after a nudge the bot waits as long as it takes
        await runner.deliver(ID, "hm")  # any reply re-arms the nudge
        clock.advance(60)
        await runner.run_due()
        assert channel.texts().count(nudge) == 2


async def test_yes_no_sub_dialog_replays_a_new_game_until_no(
    store: Store, clock: VirtualClock, channel: ListChannel, cache_size: int
) -> None:
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await runner.start(guessbot.main, ID)
        first = await play_to_win(runner, channel)
        await runner.deliver(ID, "maybe")
        assert channel.texts()[-1] == "Sorry, I need a yes or a no."
        await runner.deliver(ID, "Yes!")
        assert channel.texts()[-1] == "I'm thinking of a number between 1 and 100. What's your guess?"
        second = await play_to_win(runner, channel)
        status = await runner.deliver(ID, "no")
        transcript = await runner.transcript(ID)
    assert len(await secrets(store)) == 2  # one recorded draw per game
    assert channel.texts()[-1] == f"Thanks for playing! 2 game(s), best score {min(first, second)}. Bye!"
    assert status.state == "completed"
    assert status.result == [first, second]
    assert [entry.text for entry in transcript if entry.direction == "out"] == channel.texts()


async def test_a_restarted_runner_continues_the_same_game(
    store: Store, clock: VirtualClock, channel: ListChannel
) -> None:
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(guessbot.main, ID)
        [secret] = await secrets(store)
        wrong = secret % 100 + 1
        await runner.deliver(ID, str(wrong))
    async with Runner(store, channel, clock=clock) as fresh:  # a new runner: an empty cache, so it replays
        await fresh.deliver(ID, str(secret))
    assert channel.texts()[2:] == [
        f"{'Lower' if wrong > secret else 'Higher'} than {wrong}.",
        f"Yes, {secret}! You got it in 2 tries.",
        "Another game? (yes/no)",
    ]
    assert await secrets(store) == [secret]  # replay never drew again
