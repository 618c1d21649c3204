"""Where time comes from: the system clock, or a virtual one for tests.

Nothing else in dynaprompt reads the time; the runner asks its clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock", "VirtualClock"]


class Clock(Protocol):
    """What a runner needs of a clock."""

    def now(self) -> datetime:
        """The current instant, timezone-aware."""

    async def sleep_until(self, instant: datetime) -> None:
        """Return once ``now() >= instant`` (or sooner; callers re-check)."""


class SystemClock:
    """The real clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep_until(self, instant: datetime) -> None:
        await anyio.sleep(max(0.0, (instant - self.now()).total_seconds()))


class VirtualClock:
    """A clock that moves only when told to.

    ``advance()`` jumps ahead and wakes everything sleeping on this clock, so a
    test can let days pass in microseconds::

        clock = VirtualClock(datetime(2026, 1, 1, 9, tzinfo=UTC))
        runner = Runner(store, clock=clock)
        clock.advance(timedelta(days=1))
        await runner.run_due()
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("VirtualClock needs an aware datetime, e.g. datetime(2026, 1, 1, tzinfo=UTC)")
        self._now = start
        self._moved: anyio.Event | None = None

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        """Move the clock forward by ``delta`` (a timedelta or seconds); return the new instant."""
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        if step < timedelta(0):
            raise ValueError("a clock only moves forward")
        self._now += step
        if self._moved is not None:
            self._moved.set()
            self._moved = None
        return self._now

    async def sleep_until(self, instant: datetime) -> None:
        while self._now < instant:
            if self._moved is None:
                self._moved = anyio.Event()
            await self._moved.wait()
