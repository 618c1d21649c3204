"""The ASGI application: dialogs over HTTP, with the timer loop running inside.

Built on Starlette: it is small, anyio-native (the runner is anyio code, so the two share one
event loop without adapters), and adds no validation layer of its own; bodies are validated
by our pydantic models directly, and the OpenAPI document is written from those same models.

::

    app = create_app([guessbot], store="sqlite:///bot.db", token="s3cret")
    # uvicorn.run(app)  -- or: dynaprompt serve examples/guessbot.py --store sqlite:///bot.db

Every error answer is JSON (:class:`~dynaprompt.http.models.ErrorBody`); library errors map to
statuses by :data:`STATUS_OF`, checked most specific first.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, get_args

import anyio
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dynaprompt.channels.base import Channel
from dynaprompt.clock import Clock
from dynaprompt.dialogs import Dialog
from dynaprompt.errors import (
    ConversationEndedError,
    ConversationExistsError,
    DynapromptError,
    InvalidInputError,
    MessageTooLargeError,
    NondeterminismError,
    StoreUnavailableError,
    TimeParseError,
    UnknownConversationError,
    UnknownDialogError,
    UnknownTimeZoneError,
)
from dynaprompt.http.models import (
    ConversationList,
    ConversationSummary,
    DialogList,
    ErrorBody,
    ErrorDetail,
    MessageIn,
    OutboundMessage,
    StartConversation,
    Transcript,
    TurnResult,
)
from dynaprompt.http.stream import ConversationStream, Hub, ServiceChannel, collect_turn
from dynaprompt.http.webhook import WebhookChannel
from dynaprompt.models import State, Status
from dynaprompt.runner import Runner
from dynaprompt.stores import Store, open_store

__all__ = ["DEFAULT_MAX_BODY_BYTES", "STATUS_OF", "create_app", "openapi_document"]

log = logging.getLogger("dynaprompt.http")

DEFAULT_MAX_BODY_BYTES = 256 * 1024
_STATES: tuple[str, ...] = get_args(State)

STATUS_OF: tuple[tuple[type[DynapromptError], int], ...] = (
    (UnknownConversationError, 404),
    (UnknownDialogError, 404),
    (ConversationExistsError, 409),
    (ConversationEndedError, 409),
    # The reply is durable, but the code no longer matches the log: the conversation is parked until a fix.
    (NondeterminismError, 409),
    (MessageTooLargeError, 413),
    (InvalidInputError, 422),
    (TimeParseError, 422),
    (UnknownTimeZoneError, 422),
    (StoreUnavailableError, 503),
)

_Model = TypeVar("_Model", bound=BaseModel)


class _Problem(Exception):
    """An HTTP-level refusal (bad body, bad token) raised inside a handler."""

    def __init__(self, status: int, kind: str, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.status, self.kind, self.message, self.errors = status, kind, message, errors
        super().__init__(message)


def _error(status: int, kind: str, message: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(status=status, type=kind, message=message, errors=errors))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers)


def _status_of(exc: DynapromptError) -> int:
    for error_type, status in STATUS_OF:
        if isinstance(exc, error_type):
            return status
    return 500


class _BearerAuth:
    """Pure ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                reason = "missing Authorization header" if not given else "wrong bearer token"
                await _error(401, "Unauthorized", f"{reason}; send 'Authorization: Bearer <token>'")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


class _Service:
    """The state behind the routes: the exposed dialogs, the runner, the hub, the limits."""

    def __init__(self, dialogs: Sequence[Dialog], max_body_bytes: int, stream_poll: float) -> None:
        self.dialogs = {chosen.name: chosen for chosen in dialogs}
        self.max_body_bytes = max_body_bytes
        self.stream_poll = stream_poll
        self.hub = Hub()
        self._runner: Runner | None = None

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise StoreUnavailableError("(not opened)", "the service has not started (lifespan not run)")
        return self._runner

    async def read(self, request: Request, model: type[_Model]) -> _Model:
        """The body as ``model``: 413 past the size limit (read no further), 400 if not JSON, 422 if invalid."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Problem(413, "RequestTooLarge", f"request body over the limit of {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _Problem(413, "RequestTooLarge", f"request body over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            if any(error["type"] == "json_invalid" for error in errors):
                raise _Problem(400, "MalformedJSON", f"the body is not valid JSON: {errors[0]['msg']}") from None
            fields = [{"loc": [str(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]
            summary = "; ".join(f"{'.'.join(f['loc']) or 'body'}: {f['msg']}" for f in fields)
            raise _Problem(422, "ValidationError", f"invalid {model.__name__}: {summary}", fields) from None

    # -- routes --------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        body = await self.read(request, StartConversation)
        chosen = self.dialogs.get(body.dialog)
        if chosen is None:
            exposed = ", ".join(sorted(self.dialogs)) or "none"
            raise _Problem(404, "UnknownDialogError", f"no dialog named {body.dialog!r} is served (served: {exposed})")
        try:
            inspect.signature(chosen.fn).bind(*body.args, **body.kwargs)
        except TypeError as exc:
            raise _Problem(
                422, "InvalidArguments", f"dialog {chosen.name!r} cannot take these arguments: {exc}"
            ) from None
        conversation_id = body.conversation_id or uuid.uuid4().hex
        with collect_turn(conversation_id) as handed:
            status = await self.runner.start(chosen, conversation_id, *body.args, **body.kwargs)
        result = TurnResult(conversation_id=conversation_id, status=status, messages=_outbound(handed))
        return _json(result, 201, headers={"Location": f"/conversations/{conversation_id}"})

    async def deliver(self, request: Request) -> Response:
        conversation_id = request.path_params["conversation_id"]
        body = await self.read(request, MessageIn)
        with collect_turn(conversation_id) as handed:
            status = await self.runner.deliver(conversation_id, body.text, metadata=body.metadata)
        return _json(TurnResult(conversation_id=conversation_id, status=status, messages=_outbound(handed)))

    async def retry(self, request: Request) -> Response:
        conversation_id = request.path_params["conversation_id"]
        with collect_turn(conversation_id) as handed:
            status = await self.runner.retry(conversation_id)
        return _json(TurnResult(conversation_id=conversation_id, status=status, messages=_outbound(handed)))

    async def status(self, request: Request) -> Response:
        return _json(await self.runner.status(request.path_params["conversation_id"]))

    async def transcript(self, request: Request) -> Response:
        conversation_id = request.path_params["conversation_id"]
        entries = await self.runner.transcript(conversation_id)
        return _json(Transcript(conversation_id=conversation_id, entries=entries))

    async def conversations(self, request: Request) -> Response:
        state = request.query_params.get("state")
        if state is not None and state not in _STATES:
            raise _Problem(422, "ValidationError", f"state must be one of {', '.join(_STATES)}, not {state!r}")
        rows = await self.runner.store.conversations(state)  # type: ignore[arg-type]
        summaries = [
            ConversationSummary(
                conversation_id=row.id,
                dialog=row.dialog,
                state=row.state,
                wake_at=row.wake_at,
                last_activity_at=row.updated_at,
                run=row.run,
                parked=row.parked,
                error=row.error,
            )
            for row in rows
        ]
        return _json(ConversationList(conversations=summaries))

    async def list_dialogs(self, request: Request) -> Response:
        return _json(DialogList(dialogs=sorted(self.dialogs)))

    async def stream(self, request: Request) -> Response:
        conversation_id = request.path_params["conversation_id"]
        after = request.headers.get("last-event-id") or request.query_params.get("after")
        stream = ConversationStream(self.runner, self.hub, conversation_id, after, poll_interval=self.stream_poll)
        await stream.check()
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream.events(), media_type="text/event-stream", headers=headers)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(sorted(self.dialogs)))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})


def _outbound(messages: list[Any]) -> list[OutboundMessage]:
    return [OutboundMessage.of(message) for message in messages]


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def create_app(
    dialogs: Sequence[Dialog],
    *,
    store: Store | str,
    token: str | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    channel: Channel | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock: Clock | None = None,
    stream_poll: float = 1.0,
    timer_loop: bool = True,
    **runner_options: Any,
) -> Starlette:
    """The ASGI app serving ``dialogs`` on ``store`` (a URL, opened and closed by the app, or a store
    you opened and close yourself).

    * ``token``: require ``Authorization: Bearer <token>`` on every request (constant-time check);
    * ``webhook_url`` / ``webhook_secret``: POST every bot message there, signed when a secret is set
      (see :mod:`dynaprompt.http.webhook`); ``channel``: another downstream channel, used when no webhook is set;
    * ``max_body_bytes``: larger request bodies get 413 without being read;
    * ``timer_loop``: run ``runner.serve()`` in the lifespan (timers, scheduled sends, retries);
    * ``clock`` and ``runner_options`` go to the :class:`~dynaprompt.runner.Runner`.

    The runner exists while the app's lifespan runs (uvicorn runs it; in tests use
    ``async with app.router.lifespan_context(app):``).
    """
    service = _Service(dialogs, max_body_bytes, stream_poll)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened = await open_store(store) if isinstance(store, str) else store
        webhook = WebhookChannel(webhook_url, secret=webhook_secret, clock=clock) if webhook_url else None
        downstream = webhook or channel
        try:
            async with Runner(opened, ServiceChannel(service.hub, downstream), clock=clock, **runner_options) as runner:
                service._runner = runner
                async with anyio.create_task_group() as group:
                    if timer_loop:
                        group.start_soon(_timer_loop, runner)
                    try:
                        yield
                    finally:
                        group.cancel_scope.cancel()
                service._runner = None
        finally:
            if webhook is not None:
                await webhook.aclose()
            if isinstance(store, str):
                await opened.close()

    async def on_library_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DynapromptError)
        status = _status_of(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(status, type(exc).__name__, str(exc))

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Problem)
        return _error(exc.status, exc.kind, exc.message, exc.errors)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return _error(exc.status_code, kind, message)

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("%s %s crashed", request.method, request.url.path)
        return _error(500, "InternalError", f"internal error: {type(exc).__name__}")

    cid = "{conversation_id}"
    routes = [
        Route("/conversations", service.start, methods=["POST"]),
        Route("/conversations", service.conversations, methods=["GET"]),
        Route(f"/conversations/{cid}", service.status, methods=["GET"]),
        Route(f"/conversations/{cid}/messages", service.deliver, methods=["POST"]),
        Route(f"/conversations/{cid}/transcript", service.transcript, methods=["GET"]),
        Route(f"/conversations/{cid}/retry", service.retry, methods=["POST"]),
        Route(f"/conversations/{cid}/stream", service.stream, methods=["GET"]),
        Route("/dialogs", service.list_dialogs, methods=["GET"]),
        Route("/openapi.json", service.openapi, methods=["GET"]),
        Route("/healthz", service.health, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        DynapromptError: on_library_error,
        _Problem: on_problem,
        HTTPException: on_http_exception,
        Exception: on_crash,
    }
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    if token:
        app.add_middleware(_BearerAuth, token=token)
    return app


async def _timer_loop(runner: Runner) -> None:
    """``runner.serve()`` for the app's lifetime; a failing store is logged and retried, never fatal."""
    while True:
        try:
            await runner.serve()
        except Exception:
            log.exception("timer loop failed; restarting it")
            await anyio.sleep(runner.poll_interval)


def openapi_document(dialogs: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service, its schemas written from the pydantic models.

    >>> document = openapi_document(["guessbot"])
    >>> sorted(document["paths"])[:3]
    ['/conversations', '/conversations/{conversation_id}', '/conversations/{conversation_id}/messages']
    >>> document["components"]["schemas"]["StartConversation"]["properties"]["dialog"]["enum"]
    ['guessbot']
    """
    models: list[type[BaseModel]] = [
        StartConversation, MessageIn, TurnResult, Status, Transcript, ConversationList, DialogList, ErrorBody,
        OutboundMessage,
    ]  # fmt: skip
    _, top = models_json_schema(
        [(model, "validation" if model in (StartConversation, MessageIn) else "serialization") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    if dialogs:
        schemas["StartConversation"]["properties"]["dialog"]["enum"] = list(dialogs)

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(description: str, name: str, media: str = "application/json") -> dict[str, Any]:
        return {"description": description, "content": {media: {"schema": ref(name)}}}

    def errors(*statuses: int) -> dict[str, Any]:
        texts = {
            400: "Malformed JSON.", 401: "Missing or wrong bearer token.", 404: "Unknown conversation or dialog.",
            409: "Exists, has ended, or is parked by a NondeterminismError.", 413: "Body or message too large.",
            422: "Invalid body or arguments.", 503: "Store unavailable.",
        }  # fmt: skip
        return {str(s): answer(texts[s], "ErrorBody") for s in (*statuses, 401, 503)}

    conversation_id = {"name": "conversation_id", "in": "path", "required": True, "schema": {"type": "string"}}
    body = {"required": True, "content": {"application/json": {"schema": ref("StartConversation")}}}
    message_body = {"required": True, "content": {"application/json": {"schema": ref("MessageIn")}}}
    sse = {
        "description": (
            "text/event-stream: one `message` event per bot message (SSE id = message id, data = OutboundMessage), "
            "then one `end` event (data = Status) once the conversation has ended with nothing left to send."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    paths: dict[str, Any] = {
        "/conversations": {
            "post": {
                "summary": "Start a conversation",
                "operationId": "startConversation",
                "requestBody": body,
                "responses": {"201": answer("Started.", "TurnResult"), **errors(400, 404, 409, 413, 422)},
            },
            "get": {
                "summary": "List conversations",
                "operationId": "listConversations",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": list(_STATES)},
                    }
                ],
                "responses": {"200": answer("The conversations.", "ConversationList"), **errors(422)},
            },
        },
        "/conversations/{conversation_id}": {
            "get": {
                "summary": "Status of a conversation",
                "operationId": "getStatus",
                "parameters": [conversation_id],
                "responses": {"200": answer("Its latest run.", "Status"), **errors(404)},
            }
        },
        "/conversations/{conversation_id}/messages": {
            "post": {
                "summary": "Deliver a user message; answers once it is durable",
                "operationId": "deliverMessage",
                "parameters": [conversation_id],
                "requestBody": message_body,
                "responses": {"200": answer("Durable and processed.", "TurnResult"), **errors(400, 404, 409, 413, 422)},
            }
        },
        "/conversations/{conversation_id}/retry": {
            "post": {
                "summary": "Replay a parked conversation against the current code (after a fix)",
                "operationId": "retryConversation",
                "parameters": [conversation_id],
                "responses": {"200": answer("Its status after the replay.", "TurnResult"), **errors(404, 409)},
            }
        },
        "/conversations/{conversation_id}/transcript": {
            "get": {
                "summary": "Every message, both directions",
                "operationId": "getTranscript",
                "parameters": [conversation_id],
                "responses": {"200": answer("The transcript.", "Transcript"), **errors(404)},
            }
        },
        "/conversations/{conversation_id}/stream": {
            "get": {
                "summary": "Server-sent events of the bot's messages, resumable",
                "operationId": "streamMessages",
                "parameters": [
                    conversation_id,
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Resume after this message id (the Last-Event-ID header does the same).",
                    },
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": sse, **errors(404, 422)},
            }
        },
        "/dialogs": {
            "get": {
                "summary": "The dialogs this service starts",
                "operationId": "listDialogs",
                "responses": {"200": answer("Their names.", "DialogList"), **errors()},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "operationId": "openapi", "responses": {"200": {"description": "OK"}}}
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dynaprompt",
            "version": "1",
            "description": (
                "Durable chatbot dialogs over HTTP. Bot messages also go to the outbound webhook when one is set: "
                "POSTed as OutboundMessage with an Idempotency-Key header (the message id) and, with a secret, "
                "X-Dynaprompt-Signature: sha256=<HMAC-SHA256 of the body>; retried until a 2xx."
            ),
        },
        "paths": paths,
        "webhooks": {
            "botMessage": {
                "post": {
                    "summary": "A bot message, POSTed to --webhook until a 2xx acknowledges it",
                    "operationId": "botMessage",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "The message id, the same on every retry: drop duplicates by it.",
                        },
                        {
                            "name": "X-Dynaprompt-Signature",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
                            "description": "With --webhook-secret: HMAC-SHA256 of the raw body under the secret.",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("OutboundMessage")}},
                    },
                    "responses": {
                        "2XX": {"description": "Acknowledged."},
                        "default": {"description": "Not acknowledged: retried with backoff."},
                    },
                }
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def dumps(document: dict[str, Any]) -> str:  # pragma: no cover - convenience for `python -m`
    return json.dumps(document, indent=2)
