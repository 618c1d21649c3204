"""``dynaprompt serve`` as a real process on 127.0.0.1, exercised over real HTTP with httpx: full games,
a stream that reconnects, a real webhook receiver, auth, SIGKILL and restart, bad input."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynaprompt.http import verify_signature

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DRAGONS = str(ROOT / "examples" / "dragons.py")
GUESSBOT = str(ROOT / "examples" / "guessbot.py")
TIMEOUT = 15.0


@dataclass
class Service:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=TIMEOUT, headers=headers)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(TIMEOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        assert self.process.stdout is not None
        self.process.stdout.close()


def start_service(tmp_path: Path, app: str, *options: str, store: str | None = None) -> Service:
    """``python -m dynaprompt.cli serve APP --port 0 ...``; returns once it said where it listens."""
    log = tmp_path / f"serve-{len(list(tmp_path.glob('serve-*.log')))}.log"
    command = [sys.executable, "-m", "dynaprompt.cli", "serve", app, "--port", "0"]
    command += ["--store", store or f"sqlite:///{tmp_path}/service.db", *options]
    env = {key: value for key, value in os.environ.items() if not key.startswith("DYNAPROMPT_")}
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    line = process.stdout.readline() if ready else ""
    found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if found is None:
        process.kill()
        process.wait(TIMEOUT)
        raise AssertionError(f"the service did not start: {line!r}\n{log.read_text()}")
    return Service(process, found.group(1), log)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    started = start_service(tmp_path, f"{DRAGONS},{GUESSBOT}")
    yield started
    started.stop()


def texts(turn: httpx.Response) -> list[str]:
    assert turn.status_code in (200, 201), turn.text
    return [message["text"] for message in turn.json()["messages"]]


def say(client: httpx.Client, conversation_id: str, text: str) -> list[str]:
    return texts(client.post(f"/conversations/{conversation_id}/messages", json={"text": text}))


def transcript(client: httpx.Client, conversation_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/conversations/{conversation_id}/transcript")
    assert response.status_code == 200, response.text
    return response.json()["entries"]  # type: ignore[no-any-return]


# -- games -------------------------------------------------------------------------


def test_a_dragons_playthrough_over_http(service: Service) -> None:
    with service.client() as client:
        assert texts(client.post("/conversations", json={"dialog": "dragons", "conversation_id": "ann"})) == [
            "Hi, I'm Ember. What's your name?"
        ]
        aside, question = say(client, "ann", "Ann")
        assert re.fullmatch(r"Ann! My neighbour has a \w+ called Ann\. It bites\.", aside)
        assert question == "Do you have a minute to talk, Ann?"
        assert say(client, "ann", "perhaps") == ["Just yes or no, please."]
        assert say(client, "ann", "Y") == ["What shall we talk about?\n1. dragons\n2. the weather"]
        assert say(client, "ann", "the weather") == ["What's the weather like where you are?"]
        assert say(client, "ann", "drizzly") == [
            "Drizzly, noted. Here it's dragon-breath warm.",
            "Do you like the rain?",
        ]
        assert say(client, "ann", "no") == ["Fair enough, it ruins a good flight.", "That was lovely, Ann. Goodbye!"]
        status = client.get("/conversations/ann").json()
        assert (status["state"], status["result"]) == ("completed", "the weather")
        entries = transcript(client, "ann")
        assert [e["text"] for e in entries if e["direction"] == "in"] == [
            "Ann", "perhaps", "Y", "the weather", "drizzly", "no"
        ]  # fmt: skip
        assert entries[2]["text"] == aside  # the pet was drawn once: the log says what the user saw


def test_a_guessbot_game_over_http(service: Service) -> None:
    with service.client() as client:
        opening = texts(client.post("/conversations", json={"dialog": "guessbot", "conversation_id": "p1"}))
        assert opening == [
            "Hi! Let's play guess the number.",
            "I'm thinking of a number between 1 and 100. What's your guess?",
        ]
        low, high, guesses = 1, 100, 0
        while True:
            guess = (low + high) // 2
            guesses += 1
            answer = say(client, "p1", str(guess))
            if answer[0].startswith("Higher"):
                low = guess + 1
            elif answer[0].startswith("Lower"):
                high = guess - 1
            else:
                assert answer == [
                    f"Yes, {guess}! You got it in {guesses} {'try' if guesses == 1 else 'tries'}.",
                    "Another game? (yes/no)",
                ]
                break
            assert guesses <= 7
        assert say(client, "p1", "no") == [f"Thanks for playing! 1 game(s), best score {guesses}. Bye!"]
        assert client.get("/conversations/p1").json()["result"] == [guesses]


# -- the stream -----------------------------------------------------------------------


class Events:
    """The message events of an open SSE response, read on demand."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.headers["content-type"].startswith("text/event-stream")
        self._lines = response.iter_lines()

    def next(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` message events, each with its SSE id."""
        found: list[dict[str, Any]] = []
        fields: dict[str, str] = {}
        for line in self._lines:
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.lstrip(" ")
                continue
            if fields.get("event") == "message":
                found.append({"sse_id": fields["id"], **json.loads(fields["data"])})
                if len(found) == count:
                    return found
            fields = {}
        raise AssertionError(f"the stream ended after {found}")


def test_a_stream_that_reconnects_mid_conversation_misses_nothing(service: Service) -> None:
    with service.client() as client, service.client() as streamer:
        client.post("/conversations", json={"dialog": "dragons", "conversation_id": "s1"})
        with streamer.stream("GET", "/conversations/s1/stream") as first:
            events = Events(first)
            [greeting] = events.next(1)
            say(client, "s1", "Bo")  # sent while connected: arrives live
            seen = [greeting, *events.next(2)]
        # Disconnected: the bot goes on talking.
        say(client, "s1", "yes")
        say(client, "s1", "1")
        with streamer.stream("GET", "/conversations/s1/stream", headers={"Last-Event-ID": seen[-1]["sse_id"]}) as again:
            events = Events(again)
            seen += events.next(2)  # the two prompts sent while away, replayed from the log
            say(client, "s1", "Toothless")
            seen += events.next(2)  # and live again
        out = [e for e in transcript(client, "s1") if e["direction"] == "out"]
        assert [m["sse_id"] for m in seen] == [m["id"] for m in seen] == [e["id"] for e in out]
        assert [m["text"] for m in seen] == [e["text"] for e in out]
        assert seen[-1]["text"] == "Would you ride a dragon if one offered?"


# -- the webhook -----------------------------------------------------------------------


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that answers 500 to its first ``failures`` requests, then 200."""

    failures: int
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    status = 500 if len(receiver.requests) < receiver.failures else 200
                    receiver.requests.append((dict(self.headers), body))
                    receiver.answered.append(status)
                    receiver.arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def acknowledged(self, count: int) -> list[tuple[dict[str, str], bytes]]:
        """Wait until ``count`` requests were answered 200; return those."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.answered.count(200) >= count, timeout=TIMEOUT), self.answered
            return [request for request, status in zip(self.requests, self.answered, strict=True) if status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    opened = Receiver(failures=request.param)
    yield opened
    opened.close()


@pytest.mark.parametrize("receiver", [2], indirect=True)
def test_the_webhook_gets_every_message_signed_even_when_the_receiver_fails_twice(
    tmp_path: Path, receiver: Receiver
) -> None:
    service = start_service(tmp_path, DRAGONS, "--webhook", receiver.url, "--webhook-secret", "hook-secret")
    try:
        with service.client() as client:
            client.post("/conversations", json={"dialog": "dragons", "conversation_id": "w1"})
            say(client, "w1", "Cy")
            delivered = receiver.acknowledged(3)
            out = [e for e in transcript(client, "w1") if e["direction"] == "out"]
    finally:
        service.stop()
    assert receiver.answered[:3] == [500, 500, 200]
    first_key = receiver.requests[0][0]["Idempotency-Key"]
    assert [headers["Idempotency-Key"] for headers, _ in receiver.requests[:3]] == [first_key] * 3
    assert [headers["Idempotency-Key"] for headers, _ in delivered] == [e["id"] for e in out]
    assert [json.loads(body)["text"] for _, body in delivered] == [e["text"] for e in out]
    for headers, body in receiver.requests:
        assert verify_signature("hook-secret", body, headers["X-Dynaprompt-Signature"])
        assert not verify_signature("other-secret", body, headers["X-Dynaprompt-Signature"])


@pytest.mark.parametrize("receiver", [6], indirect=True)
def test_a_receiver_down_for_longer_gets_the_message_later_from_the_timer_loop(
    tmp_path: Path, receiver: Receiver
) -> None:
    service = start_service(tmp_path, DRAGONS, "--webhook", receiver.url)
    try:
        with service.client() as client:
            started = client.post("/conversations", json={"dialog": "dragons", "conversation_id": "w2"})
            assert started.status_code == 201  # the message is durable even though nobody took it yet
            [(headers, body)] = receiver.acknowledged(1)
    finally:
        service.stop()
    assert receiver.answered == [500] * 6 + [200]
    assert headers["Idempotency-Key"] == started.json()["messages"][0]["id"]
    assert "X-Dynaprompt-Signature" not in headers
    assert json.loads(body)["text"] == "Hi, I'm Ember. What's your name?"


# -- auth ------------------------------------------------------------------------------------


def test_with_a_token_every_route_needs_it_over_http(tmp_path: Path) -> None:
    service = start_service(tmp_path, DRAGONS, "--token", "tok-123")
    try:
        with service.client() as anonymous, service.client("wrong") as wrong, service.client("tok-123") as good:
            for client in (anonymous, wrong):
                for method, path in [
                    ("POST", "/conversations"), ("GET", "/conversations"), ("GET", "/conversations/t1"),
                    ("GET", "/conversations/t1/stream"), ("POST", "/conversations/t1/messages"),
                    ("GET", "/openapi.json"),
                ]:  # fmt: skip
                    response = client.request(method, path, json={"dialog": "dragons", "conversation_id": "t1"})
                    assert response.status_code == 401, (method, path)
                    assert response.json()["error"]["type"] == "Unauthorized"
            assert good.get("/conversations").json() == {"conversations": []}  # nothing was started above
            assert good.post("/conversations", json={"dialog": "dragons", "conversation_id": "t1"}).status_code == 201
            assert say(good, "t1", "Di")[1] == "Do you have a minute to talk, Di?"
    finally:
        service.stop()


# -- crash and restart ----------------------------------------------------------------------------


def test_after_sigkill_and_restart_conversations_continue_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/crash.db"
    service = start_service(tmp_path, GUESSBOT, store=store)
    acknowledged: list[str] = []
    enough = threading.Event()
    lock = threading.Lock()

    def post(text: str) -> None:
        try:
            with service.client() as client:
                response = client.post("/conversations/g1/messages", json={"text": text})
        except httpx.HTTPError:
            return  # cut off by the kill: never acknowledged, so it may or may not be stored
        if response.status_code == 200:
            with lock:
                acknowledged.append(text)
                if len(acknowledged) >= 6:
                    enough.set()

    with service.client() as client:
        client.post("/conversations", json={"dialog": "guessbot", "conversation_id": "g1"})
        say(client, "g1", "101")  # out of range: the game goes on
    with ThreadPoolExecutor(6) as pool:
        for number in range(24):
            pool.submit(post, f"word{number}")
        assert enough.wait(TIMEOUT)
        service.kill()  # with requests in flight
    service.stop()
    assert 6 <= len(acknowledged) < 24

    service = start_service(tmp_path, GUESSBOT, store=store)
    try:
        with service.client() as client:
            inbound = [e["text"] for e in transcript(client, "g1") if e["direction"] == "in"]
            assert set(acknowledged) <= set(inbound)
            assert inbound[0] == "101"
            assert len(inbound) == len(set(inbound))  # each message stored once
            # It goes on after the restart: a new message gets its answer...
            assert say(client, "g1", "tea") == ["'tea' is not a whole number. Try something like 50."]
            out = [e["text"] for e in transcript(client, "g1") if e["direction"] == "out"]
        # ...and so did every word stored before the kill (the inbound after "101"), "tea" included.
        assert sum(text.endswith("is not a whole number. Try something like 50.") for text in out) == len(inbound)
    finally:
        service.stop()


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_over_http_gets_the_right_4xx_and_stores_nothing(service: Service) -> None:
    with service.client() as client:
        client.post("/conversations", json={"dialog": "guessbot", "conversation_id": "b1"})
        before = (client.get("/conversations").json(), transcript(client, "b1"))
        json_headers = {"Content-Type": "application/json"}
        cases = [
            ("POST", "/conversations", b'{"dialog": "guessbot",', 400),
            ("POST", "/conversations", b'{"dialog": ["guessbot"]}', 422),
            ("POST", "/conversations", b'{"dialog": "guessbot", "args": ["one", "two", "three", "four"]}', 422),
            ("POST", "/conversations", b'{"dialog": "no-such-dialog"}', 404),
            ("POST", "/conversations", b'{"dialog": "guessbot", "conversation_id": "b1"}', 409),
            ("POST", "/conversations/b1/messages", b"not json at all", 400),
            ("POST", "/conversations/b1/messages", b'{"text": 50}', 422),
            ("POST", "/conversations/b1/messages", b'{"text": "' + b"9" * 2_000_000 + b'"}', 413),
            ("POST", "/conversations/b1/messages", json.dumps({"text": "9" * 20_000}).encode(), 413),
            ("POST", "/conversations/nobody/messages", b'{"text": "50"}', 404),
            ("GET", "/conversations/nobody", None, 404),
            ("GET", "/conversations/nobody/transcript", None, 404),
            ("GET", "/conversations/b1/stream?after=b1:999", None, 422),
        ]
        for method, path, body, status in cases:
            response = client.request(method, path, content=body, headers=json_headers)
            assert response.status_code == status, (path, body[:60] if body else None, response.text)
            error = response.json()["error"]
            assert error["status"] == status
            assert error["message"]
        assert (client.get("/conversations").json(), transcript(client, "b1")) == before


# -- the example client ----------------------------------------------------------------------------


def test_the_example_client_prints_the_streamed_bot_messages_until_the_end(service: Service) -> None:
    client = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "http_client.py"),
            "dragons",
            "--conversation",
            "cli",
            "--url",
            service.url,
        ],
        input="Eve\nno\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert client.returncode == 0, client.stderr
    lines = client.stdout.splitlines()
    assert lines[0] == "bot> Hi, I'm Ember. What's your name?"
    assert re.fullmatch(r"bot> Eve! My neighbour has a \w+ called Eve\. It bites\.", lines[1])
    assert lines[2:] == [
        "bot> Do you have a minute to talk, Eve?",
        "bot> Another time then. Goodbye, Eve!",
        "-- conversation completed",
    ]
