"""Shared fixtures: stores, a virtual clock, a collecting channel, hypothesis profiles."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from dynaprompt import ListChannel, Store, open_store
from dynaprompt.testing import VirtualClock

settings.register_profile(
    "ci", max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # a Monday


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(START)


@pytest.fixture
def channel() -> ListChannel:
    return ListChannel()


StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL of every embedded kind (the MongoDB leg is added by its own fixture)."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path}/test.db"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    yield opened
    await opened.close()
