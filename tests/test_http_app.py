"""The HTTP service in-process (httpx over ASGI, lifespan run): answers, errors, auth, OpenAPI, streams of
ended conversations, and the timer loop running inside the service."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from dynaprompt import InvalidInputError, Runner, Store, StoreUnavailableError, dialog, finish, send, wait_for_reply
from dynaprompt.events import Event
from dynaprompt.http import create_app, openapi_document
from dynaprompt.http.stream import ConversationStream, Hub, ServiceChannel
from dynaprompt.loading import load_dialog
from dynaprompt.stores.base import ConversationRow
from dynaprompt.stores.memory import MemoryStore
from dynaprompt.testing import VirtualClock

pytestmark = pytest.mark.anyio

DRAGONS = load_dialog(str(Path(__file__).resolve().parent.parent / "examples" / "dragons.py"))


@dialog(name="test_http.echo")
async def echo(greeting: str = "Say something."):
    yield send(greeting)
    while True:
        reply = yield wait_for_reply()
        if reply.text == "bye":
            yield send("Bye!")
            yield finish(reply.text)
        yield send(f"echo: {reply.text}")


async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=10) as client:
            yield client


@pytest.fixture
async def client(store: Store, clock: VirtualClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app([echo, DRAGONS], store=store, clock=clock, max_body_bytes=4096, max_message_chars=100)
    async for opened in _client(app):
        yield opened


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["status"] == response.status_code
    return body["error"]  # type: ignore[no-any-return]


async def stored(client: httpx.AsyncClient) -> list[tuple[str, int]]:
    """Every conversation with its last seq: what 'nothing was stored' is checked against."""
    listing = (await client.get("/conversations")).json()["conversations"]
    statuses = [(await client.get(f"/conversations/{c['conversation_id']}")).json() for c in listing]
    return [(status["conversation_id"], status["last_seq"]) for status in statuses]


async def test_start_and_deliver_answer_with_the_bot_messages_of_that_turn(client: httpx.AsyncClient) -> None:
    started = await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})
    assert started.status_code == 201
    assert started.headers["location"] == "/conversations/c1"
    assert [m["text"] for m in started.json()["messages"]] == ["Say something."]
    assert started.json()["status"]["state"] == "waiting_for_reply"

    turn = await client.post("/conversations/c1/messages", json={"text": "hello", "metadata": {"via": "test"}})
    assert turn.status_code == 200
    assert [m["text"] for m in turn.json()["messages"]] == ["echo: hello"]

    transcript = (await client.get("/conversations/c1/transcript")).json()
    assert turn.json()["messages"][0]["id"] == transcript["entries"][2]["id"]
    assert [(e["direction"], e["text"]) for e in transcript["entries"]] == [
        ("out", "Say something."),
        ("in", "hello"),
        ("out", "echo: hello"),
    ]
    assert transcript["entries"][1]["metadata"] == {"via": "test"}


async def test_dialog_arguments_are_passed_and_a_fresh_id_is_made_when_none_is_given(
    client: httpx.AsyncClient,
) -> None:
    started = await client.post("/conversations", json={"dialog": "test_http.echo", "kwargs": {"greeting": "Yo."}})
    assert started.status_code == 201
    conversation_id = started.json()["conversation_id"]
    assert len(conversation_id) == 32
    assert (await client.get(f"/conversations/{conversation_id}")).json()["state"] == "waiting_for_reply"
    assert [m["text"] for m in started.json()["messages"]] == ["Yo."]


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b'{"dialog": "test_http.echo", ', 400, "MalformedJSON"),
        (b"", 400, "MalformedJSON"),
        (b'{"dialog": 5}', 422, "ValidationError"),
        (b'{"dialog": "test_http.echo", "args": {"a": 1}}', 422, "ValidationError"),
        (b'{"dialog": "test_http.echo", "conversation_id": "a/b"}', 422, "ValidationError"),
        (b'{"dialog": "test_http.echo", "conversation_id": ""}', 422, "ValidationError"),
        (b'{"dialog": "test_http.echo", "colour": "red"}', 422, "ValidationError"),
        (b'{"dialog": "test_http.echo", "args": [1, 2, 3]}', 422, "InvalidArguments"),
        (b'{"dialog": "test_http.echo", "kwargs": {"nope": 1}}', 422, "InvalidArguments"),
        (b'{"dialog": "blocks.yes_no"}', 404, "UnknownDialogError"),
        (b'{"dialog": "nonexistent"}', 404, "UnknownDialogError"),
        (b'{"dialog": "test_http.echo", "pad": "' + b"x" * 5000 + b'"}', 413, "RequestTooLarge"),
    ],
)
async def test_a_bad_start_gets_a_clear_4xx_and_stores_nothing(
    client: httpx.AsyncClient, body: bytes, status: int, kind: str
) -> None:
    await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "keep"})
    before = await stored(client)
    response = await client.post("/conversations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = error_of(response)
    assert error["type"] == kind
    assert error["message"]
    assert await stored(client) == before


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/conversations/c1/messages", b'{"text": ', 400, "MalformedJSON"),
        ("/conversations/c1/messages", b'{"text": 42}', 422, "ValidationError"),
        ("/conversations/c1/messages", b'{"text": null}', 422, "ValidationError"),
        ("/conversations/c1/messages", b'["hello"]', 422, "ValidationError"),
        ("/conversations/c1/messages", b'{"text": "hi", "metadata": "x"}', 422, "ValidationError"),
        ("/conversations/c1/messages", json.dumps({"text": "x" * 101}).encode(), 413, "MessageTooLargeError"),
        ("/conversations/c1/messages", json.dumps({"text": "x" * 5000}).encode(), 413, "RequestTooLarge"),
        ("/conversations/nobody/messages", b'{"text": "hi"}', 404, "UnknownConversationError"),
    ],
)
async def test_a_bad_message_gets_a_clear_4xx_and_stores_nothing(
    client: httpx.AsyncClient, path: str, body: bytes, status: int, kind: str
) -> None:
    await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})
    before = await stored(client)
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert error_of(response)["type"] == kind
    assert await stored(client) == before
    assert len((await client.get("/conversations/c1/transcript")).json()["entries"]) == 1


async def test_a_body_larger_than_it_declares_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed, so the limit applies while reading
        yield b'{"text": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    response = await client.post("/conversations/c1/messages", content=chunks())
    assert response.status_code == 413
    assert error_of(response)["type"] == "RequestTooLarge"
    assert len((await client.get("/conversations/c1/transcript")).json()["entries"]) == 1


async def test_unknown_conversations_and_routes_are_404_and_wrong_methods_405(client: httpx.AsyncClient) -> None:
    for path in ("/conversations/ghost", "/conversations/ghost/transcript", "/conversations/ghost/stream"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert error_of(response)["type"] == "UnknownConversationError"
    assert error_of(await client.get("/nowhere"))["type"] == "NotFound"
    assert (await client.delete("/conversations")).status_code == 405
    response = await client.get("/conversations", params={"state": "asleep"})
    assert response.status_code == 422
    assert "waiting_for_reply" in error_of(response)["message"]


async def test_starting_a_live_id_is_409_and_an_ended_one_starts_again(client: httpx.AsyncClient) -> None:
    await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})
    again = await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})
    assert again.status_code == 409
    assert error_of(again)["type"] == "ConversationExistsError"

    assert (await client.post("/conversations/c1/messages", json={"text": "bye"})).json()["status"]["state"] == (
        "completed"
    )
    ended = await client.post("/conversations/c1/messages", json={"text": "anyone?"})
    assert ended.status_code == 409
    assert error_of(ended)["type"] == "ConversationEndedError"

    restarted = await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})
    assert restarted.status_code == 201
    assert restarted.json()["status"]["run"] == 2


async def test_listing_filters_by_state(client: httpx.AsyncClient) -> None:
    await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "open"})
    await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "done"})
    await client.post("/conversations/done/messages", json={"text": "bye"})
    completed = (await client.get("/conversations", params={"state": "completed"})).json()["conversations"]
    assert [c["conversation_id"] for c in completed] == ["done"]
    everything = (await client.get("/conversations")).json()["conversations"]
    assert sorted(c["conversation_id"] for c in everything) == ["done", "open"]
    assert (await client.get("/dialogs")).json() == {"dialogs": ["dragons", "test_http.echo"]}


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            events.append(fields)
    return events


async def test_the_stream_of_an_ended_conversation_replays_after_the_given_id_then_ends(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})
    await client.post("/conversations/c1/messages", json={"text": "one"})
    await client.post("/conversations/c1/messages", json={"text": "bye"})

    entries = (await client.get("/conversations/c1/transcript")).json()["entries"]
    out = [e["id"] for e in entries if e["direction"] == "out"]
    whole = sse_events((await client.get("/conversations/c1/stream")).text)
    assert [(e["event"], e.get("id")) for e in whole] == [*(("message", mid) for mid in out), ("end", None)]
    assert [json.loads(e["data"])["text"] for e in whole[:-1]] == ["Say something.", "echo: one", "Bye!"]
    assert json.loads(whole[-1]["data"])["state"] == "completed"

    resumed = sse_events((await client.get("/conversations/c1/stream", headers={"Last-Event-ID": out[1]})).text)
    assert [json.loads(e["data"])["text"] for e in resumed if e["event"] == "message"] == ["Bye!"]
    after_reply = entries[1]["id"]  # an inbound message's id is a position to resume after, too
    by_query = sse_events((await client.get("/conversations/c1/stream", params={"after": after_reply})).text)
    assert [e.get("id") for e in by_query] == [out[1], out[2], None]

    unknown = await client.get("/conversations/c1/stream", params={"after": "c1:99"})
    assert unknown.status_code == 422
    assert "c1:99" in error_of(unknown)["message"]


async def test_the_timer_loop_runs_inside_the_service(client: httpx.AsyncClient, clock: VirtualClock) -> None:
    started = await client.post("/conversations", json={"dialog": "dragons", "conversation_id": "quiet"})
    assert started.json()["status"]["state"] == "waiting_for_reply"
    clock.advance(timedelta(minutes=10))
    with anyio.fail_after(5):
        while True:
            entries = (await client.get("/conversations/quiet/transcript")).json()["entries"]
            if len(entries) > 1:
                break
            await anyio.sleep(0.01)
    assert [e["text"] for e in entries] == ["Hi, I'm Ember. What's your name?", "Still there? No rush, I'll wait."]


async def test_with_a_token_every_request_needs_the_bearer_header(store: Store) -> None:
    app = create_app([echo], store=store, token="s3cret")
    async for client in _client(app):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = await client.post(
                "/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"}, headers=headers
            )
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert error_of(response)["type"] == "Unauthorized"
            assert (await client.get("/openapi.json", headers=headers)).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/conversations", headers=good)).json() == {"conversations": []}
        started = await client.post(
            "/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"}, headers=good
        )
        assert started.status_code == 201


async def test_without_a_token_no_header_is_needed(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"ok": True}


async def test_openapi_describes_every_route_with_the_pydantic_schemas(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/conversations",
        "/conversations/{conversation_id}",
        "/conversations/{conversation_id}/messages",
        "/conversations/{conversation_id}/transcript",
        "/conversations/{conversation_id}/retry",
        "/conversations/{conversation_id}/stream",
        "/dialogs",
        "/openapi.json",
    }
    schemas = document["components"]["schemas"]
    assert schemas["StartConversation"]["properties"]["dialog"]["enum"] == ["dragons", "test_http.echo"]
    assert schemas["MessageIn"]["required"] == ["text"]
    deliver = document["paths"]["/conversations/{conversation_id}/messages"]["post"]
    assert deliver["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/MessageIn"}
    assert set(deliver["responses"]) >= {"200", "400", "401", "404", "409", "413", "422"}
    hook = document["webhooks"]["botMessage"]["post"]
    assert hook["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OutboundMessage"
    }
    assert [p["name"] for p in hook["parameters"]] == ["Idempotency-Key", "X-Dynaprompt-Signature"]
    refs = {ref for ref in _refs(document)}
    assert refs <= {f"#/components/schemas/{name}" for name in schemas}
    assert openapi_document(["dragons", "test_http.echo"]) == document


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


class FlakyStore(MemoryStore):
    """A memory store whose database can be 'unplugged': every read then fails as an unreachable server does."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError(self.url, "connection refused")

    async def get(self, conversation_id: str) -> ConversationRow | None:
        self._check()
        return await super().get(conversation_id)

    async def acquire(self, *args: Any, **kwargs: Any) -> ConversationRow | None:
        self._check()
        return await super().acquire(*args, **kwargs)

    async def load(self, conversation_id: str, after_seq: int = 0) -> list[Event]:
        self._check()
        return await super().load(conversation_id, after_seq)

    async def append(self, *args: Any, **kwargs: Any) -> ConversationRow:
        self._check()
        return await super().append(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> bool:
        self._check()
        return await super().release(*args, **kwargs)


async def test_an_unreachable_store_is_503_and_the_service_recovers(clock: VirtualClock) -> None:
    store = FlakyStore()
    app = create_app([echo], store=store, clock=clock)
    async for client in _client(app):
        await client.post("/conversations", json={"dialog": "test_http.echo", "conversation_id": "c1"})
        store.down = True
        for response in (
            await client.post("/conversations/c1/messages", json={"text": "hello"}),
            await client.get("/conversations/c1"),
        ):
            assert response.status_code == 503
            assert error_of(response) == {
                "status": 503,
                "type": "StoreUnavailableError",
                "message": "store memory:// is unavailable: connection refused",
            }
        store.down = False
        assert texts_of(await client.post("/conversations/c1/messages", json={"text": "again"})) == ["echo: again"]


def texts_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [message["text"] for message in response.json()["messages"]]


@dialog(name="test_http.burst")
async def burst():
    yield send("Ready?")
    yield wait_for_reply()
    for number in range(1, 6):
        yield send(f"m{number}")
    yield wait_for_reply()


@pytest.mark.parametrize("buffer", [256, 2], ids=["live", "reader-too-slow"])
async def test_a_stream_gets_every_message_in_order_even_when_its_reader_lags(
    store: Store, clock: VirtualClock, buffer: int
) -> None:
    hub = Hub(buffer=buffer)
    async with Runner(store, ServiceChannel(hub), clock=clock) as runner:
        await runner.start(burst, "b")
        # A poll far beyond the test's patience: messages must come from the hub (or its overflow signal).
        stream = ConversationStream(runner, hub, "b", None, poll_interval=60)
        await stream.check()
        events = stream.events()
        assert (await events.__anext__()).startswith("retry:")
        assert '"text":"Ready?"' in await events.__anext__()
        # The reader is not reading while five messages are sent: with a buffer of 2 its queue overflows.
        await runner.deliver("b", "go")
        with anyio.fail_after(5):
            chunks = [await events.__anext__() for _ in range(5)]
        await events.aclose()
    assert [json.loads(chunk.split("data: ", 1)[1])["text"] for chunk in chunks] == ["m1", "m2", "m3", "m4", "m5"]
    assert hub._subscribers == {}  # the subscription ended with the stream


async def test_a_message_to_a_conversation_whose_code_changed_is_stored_and_answered_409(
    store: Store, clock: VirtualClock
) -> None:
    @dialog(name="test_http.changing")
    async def before():
        yield send("What's your name?")
        reply = yield wait_for_reply()
        yield send(f"Hi {reply.text}.")
        yield wait_for_reply()

    app = create_app([before], store=store, clock=clock, cache_size=0)  # no cache: every turn replays the log
    async for client in _client(app):
        await client.post("/conversations", json={"dialog": "test_http.changing", "conversation_id": "c1"})
        await client.post("/conversations/c1/messages", json={"text": "Ann"})

        @dialog(name="test_http.changing")  # a deploy changed the dialog under a live conversation
        async def after():
            yield send("What's your name?")
            reply = yield wait_for_reply()
            yield send(f"Hello {reply.text}!")
            yield wait_for_reply()

        response = await client.post("/conversations/c1/messages", json={"text": "still here"})
        assert response.status_code == 409
        error = error_of(response)
        assert error["type"] == "NondeterminismError"
        assert "send('Hi Ann.')" in error["message"]
        assert "send('Hello Ann!')" in error["message"]
        status = (await client.get("/conversations/c1")).json()
        assert status["state"] == "failed"
        assert status["error"].startswith("NondeterminismError")
        entries = (await client.get("/conversations/c1/transcript")).json()["entries"]
        assert entries[-1]["text"] == "still here"  # the message is durable, waiting for a fix

        dialog(name="test_http.changing")(before.fn)  # the fix: deploy the old code again
        retried = await client.post("/conversations/c1/retry")
        assert retried.status_code == 200
        assert retried.json()["status"]["state"] == "completed"  # it took "still here" and went on
        assert (await client.post("/conversations/ghost/retry")).status_code == 404


async def test_the_runner_refuses_arguments_that_do_not_fit_the_dialog_and_stores_nothing(
    store: Store, clock: VirtualClock
) -> None:
    # The service checks arguments itself too; this is the runner's own guard, which embedders rely on.
    async with Runner(store, clock=clock) as runner:
        with pytest.raises(InvalidInputError, match="cannot take these arguments"):
            await runner.start(echo, "c1", "one", "two")
        assert await store.get("c1") is None
        assert (await runner.start(echo, "c1", "Hello.")).state == "waiting_for_reply"
