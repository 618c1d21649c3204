"""Instants the runner reports are in UTC, whatever the conversation's zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dynaprompt import Runner, Store, dialog, send, set_timezone, sleep_until
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio


@dialog(name="tests.status_times:tokyo_alarm")
async def tokyo_alarm():
    yield set_timezone("Asia/Tokyo")
    yield sleep_until("tomorrow at 9am")
    yield send("Ohayō!")


async def test_status_wake_at_is_utc(store: Store, clock: VirtualClock) -> None:
    async with Runner(store, clock=clock) as runner:
        status = await runner.start(tokyo_alarm, "t1")
    assert status.state == "sleeping"
    assert status.wake_at is not None
    assert status.wake_at.utcoffset() == timedelta(0)
    assert status.wake_at == datetime(2026, 1, 6, 0, tzinfo=UTC)  # 09:00 in Tokyo (UTC+9)
