"""Shared fixtures: stores, a virtual clock, a collecting channel, hypothesis profiles."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from dynaprompt import ListChannel, Runner, Store, open_store
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


@pytest.fixture(params=[1024, 0], ids=["cache", "no-cache"])
def cache_size(request: pytest.FixtureRequest) -> int:
    """With the cache off (0), every step replays the conversation from its log, as after a restart."""
    return int(request.param)


@pytest.fixture
async def runner(store: Store, channel: ListChannel, clock: VirtualClock, cache_size: int) -> AsyncIterator[Runner]:
    """A runner on the store under test, with the cache on and off."""
    async with Runner(store, channel, clock=clock, cache_size=cache_size) as opened:
        yield opened


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


def run_benchmark(script: Path, *args: str, timeout: float = 300) -> str:
    """Run a benchmark script with this interpreter; its standard output, once it has exited 0."""
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _load_test_helper(name: str) -> Any:
    """Import ``tests/<name>.py`` (the tests folder is not a package under ``--import-mode=importlib``)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mongodb_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Any]]:
    """Start SecantusDB servers (``tests/mongo_server.MongoServer``) in temporary folders; stopped at the end."""
    helper = _load_test_helper("mongo_server")
    started: list[Any] = []

    def make() -> Any:
        server = helper.MongoServer(tmp_path_factory.mktemp("mongodb") / "data", external_uri=helper.external_uri())
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def mongodb_uri(mongodb_server_factory: Callable[[], Any]) -> str:
    """``mongodb://127.0.0.1:port`` of a real MongoDB wire server shared by the session
    (SecantusDB, or the server ``DYNAPROMPT_TEST_MONGODB_URI`` names)."""
    return str(mongodb_server_factory().uri)


@pytest.fixture
def mongodb_url(mongodb_uri: str) -> str:
    """A URL naming a fresh database on the session's MongoDB server."""
    return str(_load_test_helper("mongo_server").fresh_database_url(mongodb_uri))
