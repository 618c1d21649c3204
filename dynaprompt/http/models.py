"""The bodies the HTTP service reads and writes, as pydantic models.

They are the single source of truth for validation *and* for the OpenAPI
document (:func:`dynaprompt.http.app.openapi_document` builds it from
``model_json_schema()``), so the two cannot drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from dynaprompt.models import Message, State, Status, TranscriptEntry

__all__ = [
    "ConversationId",
    "ConversationList",
    "ConversationSummary",
    "DialogList",
    "ErrorBody",
    "ErrorDetail",
    "MessageIn",
    "OutboundMessage",
    "StartConversation",
    "Transcript",
    "TurnResult",
]

# No "/" (it would split the path) and no whitespace; long enough for any platform's chat id.
ConversationId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\s/]+$")]


class _Body(BaseModel):
    # Unknown fields are refused rather than ignored: a typo ("txt") must not pass silently.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StartConversation(_Body):
    """``POST /conversations``: start ``dialog(*args, **kwargs)`` as conversation ``conversation_id``.

    Without ``conversation_id`` the service picks a fresh one (returned in the answer).
    """

    dialog: Annotated[str, Field(min_length=1, max_length=300, description="A dialog name the service exposes.")]
    conversation_id: ConversationId | None = None
    args: list[JsonValue] = Field(default_factory=list, description="Positional arguments of the dialog.")
    kwargs: dict[str, JsonValue] = Field(default_factory=dict, description="Keyword arguments of the dialog.")


class MessageIn(_Body):
    """``POST /conversations/{id}/messages``: one inbound user message."""

    text: str
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class OutboundMessage(BaseModel):
    """A bot message, as the stream, the webhook and turn results carry it.

    ``id`` is ``"<conversation_id>:<seq>"``: the same on every re-delivery, so it is the idempotency key.
    """

    id: str
    conversation_id: str
    text: str
    at: datetime
    to: str | None = None
    metadata: dict[str, JsonValue] = {}

    @classmethod
    def of(cls, message: Message) -> OutboundMessage:
        return cls.model_validate(message.model_dump())

    @classmethod
    def of_entry(cls, conversation_id: str, entry: TranscriptEntry) -> OutboundMessage:
        return cls(id=entry.id, conversation_id=conversation_id, text=entry.text, at=entry.at, metadata=entry.metadata)


class TurnResult(BaseModel):
    """What starting a conversation or delivering a message did.

    ``status`` is read after the conversation was advanced; ``messages`` are the
    bot messages this request handed off (empty when another process holds the
    conversation and advances it: the stream and the webhook carry them then).
    """

    conversation_id: str
    status: Status
    messages: list[OutboundMessage] = []


class Transcript(BaseModel):
    """``GET /conversations/{id}/transcript``: every message of every run, both directions, in log order."""

    conversation_id: str
    entries: list[TranscriptEntry]


class ConversationSummary(BaseModel):
    """One row of ``GET /conversations``."""

    conversation_id: str
    dialog: str
    state: State
    wake_at: datetime | None = None
    last_activity_at: datetime
    run: int
    parked: bool = False
    error: str | None = None


class ConversationList(BaseModel):
    conversations: list[ConversationSummary]


class DialogList(BaseModel):
    """``GET /dialogs``: the names ``POST /conversations`` accepts."""

    dialogs: list[str]


class ErrorDetail(BaseModel):
    status: int
    type: str = Field(description="The error's class name, e.g. UnknownConversationError or RequestTooLarge.")
    message: str
    errors: list[dict[str, JsonValue]] | None = Field(default=None, description="Field errors of a 422.")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorDetail


StreamEventName = Literal["message", "end"]
