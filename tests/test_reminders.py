"""The reminders example, played through a Runner on a virtual clock, as a user would see it.

Every conversation test runs on both embedded stores and with the cache on and
off (off: every step replays the conversation from its log, what a restart does).
"""

from __future__ import annotations

import doctest
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from dynaprompt import ListChannel, Runner, Store, open_store
from dynaprompt.loading import load_module
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

REMINDERS = Path(__file__).resolve().parent.parent / "examples" / "reminders.py"
reminders = load_module(str(REMINDERS))
ID = "ann"


async def say(runner: Runner, channel: ListChannel, text: str) -> list[str]:
    """Deliver ``text``; return what the bot answered."""
    before = len(channel.messages)
    await runner.deliver(ID, text)
    return channel.texts()[before:]


async def begin(runner: Runner, channel: ListChannel, zone: str = "Europe/Paris") -> None:
    await runner.start(reminders.main, ID)
    assert channel.texts()[-1].startswith("Hi! I'm your reminder bot. Which time zone are you in?")
    [answer] = await say(runner, channel, zone)
    assert answer.startswith(f"Got it: times are in {zone}.")


def fired(channel: ListChannel) -> list[str]:
    return [text for text in channel.texts() if text.startswith("Reminder: ")]


async def test_one_off_reminder_fires_at_its_time_and_not_before(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    await begin(runner, channel)  # 09:00 UTC is 10:00 in Paris
    answer = await say(runner, channel, "remind me in 20 minutes to call Sam")
    assert answer == ["OK, I'll remind you to call Sam on Monday 5 January at 10:20 CET (reminder 1)."]
    clock.advance(timedelta(minutes=20) - timedelta(seconds=1))
    await runner.run_due()
    assert fired(channel) == []
    clock.advance(timedelta(seconds=1))
    await runner.run_due()
    assert fired(channel) == ["Reminder: call Sam"]
    [message] = [m for m in channel.messages if m.text == "Reminder: call Sam"]
    assert message.at == datetime(2026, 1, 5, 9, 20, tzinfo=UTC)
    clock.advance(timedelta(days=2))
    await runner.run_due()
    assert fired(channel) == ["Reminder: call Sam"]  # once
    assert (await runner.status(ID)).state == "waiting_for_reply"


async def test_tomorrow_at_9am_is_read_on_the_users_wall_clock(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    await begin(runner, channel, "America/New_York")  # Monday 09:00 UTC is 04:00 in New York
    answer = await say(runner, channel, "remind me tomorrow at 9am to water the plants")
    assert answer == ["OK, I'll remind you to water the plants on Tuesday 6 January at 09:00 EST (reminder 1)."]
    clock.advance(datetime(2026, 1, 6, 14, tzinfo=UTC) - clock.now() - timedelta(minutes=1))
    await runner.run_due()
    assert fired(channel) == []
    clock.advance(timedelta(minutes=1))
    await runner.run_due()
    assert fired(channel) == ["Reminder: water the plants"]


async def test_recurring_reminder_fires_on_weekdays_at_10_across_a_weekend_and_a_dst_change(
    store: Store, channel: ListChannel, cache_size: int
) -> None:
    # Friday 27 March 2026, 08:00 in London (GMT); clocks go forward on Sunday 29 March.
    clock = VirtualClock(datetime(2026, 3, 27, 8, tzinfo=UTC))
    delivered_at: list[datetime] = []
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as runner:
        await begin(runner, channel, "Europe/London")
        answer = await say(runner, channel, "remind me to stretch every weekday at 10am")
        assert answer == [
            "OK, I'll remind you to stretch every weekday at 10am (reminder 1), first on Friday 27 March at 10:00 GMT."
        ]
        while clock.now() < datetime(2026, 4, 1, 0, tzinfo=UTC):
            clock.advance(timedelta(hours=1))
            before = len(fired(channel))
            await runner.run_due()
            delivered_at += [clock.now()] * (len(fired(channel)) - before)
    assert delivered_at == [
        datetime(2026, 3, 27, 10, tzinfo=UTC),  # Friday 10:00 GMT
        datetime(2026, 3, 30, 9, tzinfo=UTC),  # Monday 10:00 BST: nothing on Saturday or Sunday
        datetime(2026, 3, 31, 9, tzinfo=UTC),  # Tuesday 10:00 BST
    ]
    london = ZoneInfo("Europe/London")
    assert {instant.astimezone(london).hour for instant in delivered_at} == {10}
    # Each was sent "at" its occurrence, so the channel and the transcript carry when it was meant for.
    due = [m.metadata["due_at"] for m in channel.messages if m.text == "Reminder: stretch"]
    assert [datetime.fromisoformat(str(text)) for text in due] == delivered_at


async def test_list_shows_reminders_in_local_time_and_cancel_removes_them(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    await begin(runner, channel)
    await say(runner, channel, "remind me in 20 minutes to call Sam")
    await say(runner, channel, "remind me to stretch every weekday at 10am")
    await say(runner, channel, "remind me tomorrow at 9am to water the plants")
    [listing] = await say(runner, channel, "list")
    assert listing.splitlines() == [
        "Your reminders:",
        "1. call Sam: on Monday 5 January at 10:20 CET",
        "2. stretch: every weekday at 10am, next on Tuesday 6 January at 10:00 CET",
        "3. water the plants: on Tuesday 6 January at 09:00 CET",
    ]
    assert await say(runner, channel, "cancel 1") == ["Cancelled reminder 1: call Sam."]
    assert await say(runner, channel, "cancel 2") == ["Cancelled reminder 2: stretch (every weekday at 10am)."]
    assert await say(runner, channel, "cancel 7") == ["You have no reminder 7. Say 'list' to see them."]
    [listing] = await say(runner, channel, "list")
    assert listing.splitlines() == ["Your reminders:", "3. water the plants: on Tuesday 6 January at 09:00 CET"]
    clock.advance(timedelta(days=3))
    await runner.run_due()
    assert fired(channel) == ["Reminder: water the plants"]  # neither cancelled one ever came
    transcript = [entry.text for entry in await runner.transcript(ID)]
    assert "Reminder: call Sam" not in transcript
    [listing] = await say(runner, channel, "list")
    assert listing.startswith("You have no reminders.")  # a delivered one-off leaves the list


async def test_cancelling_a_reminder_already_sent_says_so(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    await begin(runner, channel)
    await say(runner, channel, "remind me in 5 minutes to call Sam")
    clock.advance(timedelta(minutes=5))
    await runner.run_due()
    assert fired(channel) == ["Reminder: call Sam"]
    # The list drops it once its time has passed, so "cancel 1" finds nothing to cancel.
    assert await say(runner, channel, "cancel 1") == ["You have no reminder 1. Say 'list' to see them."]


@pytest.mark.parametrize(
    "request_text",
    ["remind me to dance at blorp o'clock", "remind me to stretch every blue moon", "remind me to nap in ages"],
)
async def test_a_time_the_bot_cannot_read_gets_a_polite_answer_and_the_bot_goes_on(
    runner: Runner, channel: ListChannel, request_text: str
) -> None:
    await begin(runner, channel)
    [answer] = await say(runner, channel, request_text)
    assert answer.startswith("Sorry, I couldn't work out when to remind you (")
    assert "Tell me things like 'remind me in 20 minutes to call Sam'" in answer
    assert (await runner.status(ID)).state == "waiting_for_reply"
    assert await say(runner, channel, "remind me in 1 hour to try again") == [
        "OK, I'll remind you to try again on Monday 5 January at 11:00 CET (reminder 1)."
    ]


async def test_a_past_time_is_refused(runner: Runner, channel: ListChannel) -> None:
    await begin(runner, channel)
    assert await say(runner, channel, "remind me yesterday to water the plants") == [
        "Sorry, 'yesterday' is Sunday 4 January at 10:00 CET, which has already passed. Give me a time in the future."
    ]


async def test_an_unknown_zone_falls_back_to_utc_until_the_user_names_a_real_one(
    runner: Runner, channel: ListChannel
) -> None:
    await runner.start(reminders.main, ID)
    assert await say(runner, channel, "Mars/Olympus_Mons") == [
        "I don't know the time zone 'Mars/Olympus_Mons', so I'll use UTC; "
        "say 'my timezone is Europe/Paris' to change it."
    ]
    assert await say(runner, channel, "remind me tomorrow at 9am to call Sam") == [
        "OK, I'll remind you to call Sam on Tuesday 6 January at 09:00 UTC (reminder 1)."
    ]
    assert await say(runner, channel, "my timezone is Atlantis/Main") == [
        "I don't know the time zone 'Atlantis/Main'. Try an IANA name such as America/New_York."
    ]
    [answer] = await say(runner, channel, "my timezone is Asia/Tokyo")
    assert answer.startswith("Got it: times are now in Asia/Tokyo.")
    assert await say(runner, channel, "remind me tomorrow at 9am to call Bo") == [
        "OK, I'll remind you to call Bo on Tuesday 6 January at 09:00 JST (reminder 2)."
    ]
    [listing] = await say(runner, channel, "list")
    assert "1. call Sam: on Tuesday 6 January at 09:00 UTC" in listing  # it keeps the zone it was made in


async def test_a_first_message_that_is_a_request_is_handled_in_utc(runner: Runner, channel: ListChannel) -> None:
    await runner.start(reminders.main, ID)
    assert await say(runner, channel, "remind me in 20 minutes to call Sam") == [
        "I'll use UTC until you tell me your time zone ('my timezone is Europe/Paris').",
        "OK, I'll remind you to call Sam on Monday 5 January at 09:20 UTC (reminder 1).",
    ]


async def test_missed_occurrences_while_no_runner_was_up_come_once_late_with_their_due_time(
    runner: Runner, channel: ListChannel, clock: VirtualClock
) -> None:
    await begin(runner, channel)
    await say(runner, channel, "remind me to stretch every day at 11am")  # 10:00 UTC
    clock.advance(timedelta(days=3, hours=2))  # Thursday 11:00 UTC: three occurrences passed unseen
    await runner.run_due()
    late = [m for m in channel.messages if m.text == "Reminder: stretch"]
    assert len(late) == 1
    assert late[0].metadata["due_at"] == "2026-01-05T10:00:00+00:00"
    [listing] = await say(runner, channel, "list")
    assert "next on Friday 9 January at 11:00 CET" in listing


async def test_reminders_survive_a_runner_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/reminders.db"
    clock = VirtualClock(datetime(2026, 1, 5, 9, tzinfo=UTC))
    first_channel = ListChannel()
    store = await open_store(url)
    async with Runner(store, first_channel, clock=clock, cache_size=0) as runner:
        await begin(runner, first_channel)
        await say(runner, first_channel, "remind me in 20 minutes to call Sam")
        await say(runner, first_channel, "remind me to stretch every weekday at 10am")
    await store.close()

    clock.advance(timedelta(days=1, hours=1))  # Tuesday 10:00 UTC, 11:00 in Paris: both are due
    channel = ListChannel()
    store = await open_store(url)
    try:
        async with Runner(store, channel, clock=clock, cache_size=0) as runner:
            await runner.run_due()
            assert sorted(fired(channel)) == ["Reminder: call Sam", "Reminder: stretch"]
            [listing] = await say(runner, channel, "list")
            assert listing.splitlines() == [
                "Your reminders:",
                "2. stretch: every weekday at 10am, next on Wednesday 7 January at 10:00 CET",
            ]
            assert await say(runner, channel, "cancel 2") == ["Cancelled reminder 2: stretch (every weekday at 10am)."]
            clock.advance(timedelta(days=7))
            await runner.run_due()
            assert sorted(fired(channel)) == ["Reminder: call Sam", "Reminder: stretch"]
    finally:
        await store.close()


def test_the_examples_helpers_do_what_their_docstrings_say() -> None:
    results = doctest.testmod(reminders)
    assert results.attempted >= 4
    assert results.failed == 0
