"""The models that cross the public API: replies, messages, status, transcript."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, JsonValue

__all__ = ["Message", "Reply", "Schedule", "State", "Status", "TranscriptEntry"]

State = Literal["running", "waiting_for_reply", "sleeping", "completed", "failed"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Reply(_Frozen):
    """An inbound message, as a dialog's ``wait_for_reply()`` receives it."""

    id: str
    text: str
    at: datetime
    metadata: dict[str, JsonValue] = {}


class Message(_Frozen):
    """An outbound message, as a channel receives it.

    ``id`` is ``"<conversation_id>:<seq>"``: the same on every re-delivery,
    so a channel can drop duplicates.
    """

    id: str
    conversation_id: str
    text: str
    at: datetime
    to: str | None = None
    metadata: dict[str, JsonValue] = {}


class Status(_Frozen):
    """Where a conversation stands (its latest run)."""

    conversation_id: str
    dialog: str
    state: State
    wake_at: datetime | None = None
    result: JsonValue = None
    error: str | None = None
    run: int = 1
    last_seq: int = 0


class TranscriptEntry(_Frozen):
    """One message of a conversation, either direction."""

    id: str
    direction: Literal["out", "in"]
    text: str
    at: datetime
    metadata: dict[str, JsonValue] = {}


class Schedule(_Frozen):
    """A scheduled conversation, as ``Runner.schedules()`` lists it."""

    id: str
    dialog: str
    conversation_id: str
    dialog_args: list[JsonValue] = []
    dialog_kwargs: dict[str, JsonValue] = {}
    tz: str
    every: str | None = None
    next_at: datetime | None
    fired: int = 0
    last_fired_at: datetime | None = None
