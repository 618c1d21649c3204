from __future__ import annotations

import pytest

from dynaprompt import ListChannel, Runner, Store, dialog, send, wait_for_reply
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio


@dialog
async def echo_twice():
    yield send("Say something.")
    reply = yield wait_for_reply()
    yield send(f"You said {reply.text!r}.")


async def test_reply_is_echoed(store: Store, clock: VirtualClock, channel: ListChannel) -> None:
    async with Runner(store, channel, clock=clock) as runner:
        await runner.start(echo_twice, "c1")
        status = await runner.deliver("c1", "hello")
    assert status.state == "completed"
    assert channel.texts() == ["Say something.", "You said 'hello'."]
