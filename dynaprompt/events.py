"""The event log: one validated, JSON-only record per thing that happened.

A conversation's log is a sequence numbered from 1 by the store (the unique
key ``(conversation_id, seq)`` makes one writer win). Events are of three
sorts:

* effect events, one per effect the dialog yielded, in yield order:
  ``sent``, ``cancelled``, ``waiting``, ``sleeping``, ``now``, ``called``,
  ``sub_started``, ``tz_set``, and ``effect_failed`` when resolving the effect
  raised (an unparseable time);
* outcome events the dialog's own code produced: ``sub_ended``,
  ``completed``, ``failed``;
* inputs from outside: ``started`` (a run begins), ``reply``,
  ``timer_fired`` (a sleep ended or a wait timed out), ``delivered`` (a
  message was handed to the channel).

Replay matches effect and outcome events against the code and absorbs inputs.
No code is stored: only JSON values, validated on read.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from operator import attrgetter
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError

from dynaprompt.errors import CorruptEventError

__all__ = [
    "Called",
    "Cancelled",
    "Completed",
    "Delivered",
    "EffectFailed",
    "ErrorInfo",
    "Event",
    "Failed",
    "NowRead",
    "ReplyReceived",
    "Sent",
    "Sleeping",
    "Started",
    "SubEnded",
    "SubStarted",
    "TimerFired",
    "TzSet",
    "Waiting",
    "build",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "events_from_json",
    "log_from_json",
]


class ErrorInfo(BaseModel):
    """An exception as data: its type name and message."""

    model_config = ConfigDict(frozen=True)
    type: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        return cls(type=type(exc).__name__, message=str(exc))

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    seq: int
    at: datetime


class Started(_Event):
    kind: Literal["started"] = "started"
    dialog: str
    version: str | None = None
    args: list[JsonValue] = Field(default_factory=list)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    tz: str = "UTC"
    run: int = 1
    schedule_id: str | None = None  # set when a schedule started this run
    occurrence: datetime | None = None  # the schedule's occurrence it fired for


class Sent(_Event):
    kind: Literal["sent"] = "sent"
    text: str
    to: str | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    due_at: datetime | None = None  # set for a scheduled send


class Cancelled(_Event):
    kind: Literal["cancelled"] = "cancelled"
    message_id: str
    ok: bool


class Waiting(_Event):
    kind: Literal["waiting"] = "waiting"
    timeout_at: datetime | None = None


class Sleeping(_Event):
    kind: Literal["sleeping"] = "sleeping"
    effect: Literal["sleep", "sleep_until"]
    until: datetime


class NowRead(_Event):
    kind: Literal["now"] = "now"
    value: datetime


class Called(_Event):
    kind: Literal["called"] = "called"
    name: str
    result: JsonValue = None
    error: ErrorInfo | None = None
    attempts: int = 1


class SubStarted(_Event):
    kind: Literal["sub_started"] = "sub_started"
    dialog: str
    args: list[JsonValue] = Field(default_factory=list)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)


class TzSet(_Event):
    kind: Literal["tz_set"] = "tz_set"
    zone: str


class EffectFailed(_Event):
    kind: Literal["effect_failed"] = "effect_failed"
    effect: str
    error: ErrorInfo


class SubEnded(_Event):
    kind: Literal["sub_ended"] = "sub_ended"
    dialog: str
    result: JsonValue = None
    error: ErrorInfo | None = None


class Completed(_Event):
    kind: Literal["completed"] = "completed"
    result: JsonValue = None


class Failed(_Event):
    kind: Literal["failed"] = "failed"
    error: ErrorInfo


class ReplyReceived(_Event):
    kind: Literal["reply"] = "reply"
    text: str
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class TimerFired(_Event):
    kind: Literal["timer_fired"] = "timer_fired"
    for_seq: int


class Delivered(_Event):
    kind: Literal["delivered"] = "delivered"
    message_id: str


Event = Annotated[
    Started
    | Sent
    | Cancelled
    | Waiting
    | Sleeping
    | NowRead
    | Called
    | SubStarted
    | TzSet
    | EffectFailed
    | SubEnded
    | Completed
    | Failed
    | ReplyReceived
    | TimerFired
    | Delivered,
    Field(discriminator="kind"),
]

INPUT_KINDS = frozenset({"reply", "timer_fired", "delivered", "started"})

_adapter: TypeAdapter[Event] = TypeAdapter(Event)
_seq_of = attrgetter("seq")
_list_adapter: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


_E = TypeVar("_E", bound=BaseModel)
_TEMPLATES: dict[type[BaseModel], dict[str, Any]] = {}
_new = object.__new__
_set = object.__setattr__
# BaseModel's own slots, set through their descriptors: cheaper than object.__setattr__ looking each one up.
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def build(cls: type[_E], /, **values: Any) -> _E:
    """An event (or another frozen model, such as a reply) the library builds itself from typed values,
    without validation (a constructor call costs about twice as much, and a turn builds several).

    Only for values of the declared types that nothing else holds (a fresh dict or list, never one a dialog
    may still change); every field without a default, and every mutable one, must be given. What comes
    from outside (a store, a dialog's arguments or results) goes through the validating constructor. The
    log still holds validated JSON only: every event read back from a store is validated.
    """
    template = _TEMPLATES.get(cls)
    if template is None:
        # A field with a default factory (a mutable one) must be given, as every field without a default.
        template = _TEMPLATES[cls] = {
            name: None if info.is_required() or info.default_factory is not None else info.default
            for name, info in cls.model_fields.items()
        }
    event = _new(cls)
    _set(event, "__dict__", {**template, **values})
    _set_fields_set(event, set(values))
    _set_extra(event, None)
    _set_private(event, None)
    return event


def event_to_json(event: Event) -> str:
    """The event as stored: JSON text of its kind and of the fields that differ from their defaults.

    The kind comes first (it picks the model a reader validates with); a field left out reads back as its
    default, so a long log is shorter to read, join and parse, and each event it loads is built with fewer
    values (a default is cheaper to fill in than a value to parse). Bodies written with every field (as
    before this format) read back the same. For display, see :func:`event_to_dict`.
    """
    rest = event.__pydantic_serializer__.to_json(event, exclude_defaults=True).decode()
    return f'{{"kind":"{event.kind}",{rest[1:]}'  # rest holds seq and at at least: never "{}"


def event_to_dict(event: Event) -> dict[str, Any]:
    """Every field of the event, defaults included, as JSON-compatible values (for display)."""
    return event.model_dump(mode="json")


def event_from_json(conversation_id: str, seq: int, text: str | bytes) -> Event:
    """Validate one stored event; a bad one raises ``CorruptEventError`` naming where it is."""
    return _checked(conversation_id, seq, lambda: _adapter.validate_json(text))


def events_from_json(conversation_id: str, rows: Sequence[tuple[int, str | bytes]]) -> list[Event]:
    """Validate ``(seq, body)`` rows of one conversation, in seq order; the first bad one raises
    ``CorruptEventError``.

    Consecutive rows are validated as one JSON array (see :func:`log_from_json`); if that does not give one
    event per row, each numbered as its row, each body is validated alone to name the bad one.
    """
    if not rows:
        return []
    first_seq = rows[0][0]
    if rows[-1][0] == first_seq + len(rows) - 1:
        try:
            joined = "[" + ",".join(body if isinstance(body, str) else body.decode() for _, body in rows) + "]"
        except UnicodeDecodeError:
            joined = ""
        events = log_from_json(joined, first_seq, len(rows)) if joined else None
        if events is not None:
            return events
    return [event_from_json(conversation_id, seq, body) for seq, body in rows]


def log_from_json(text: str, first_seq: int, count: int) -> list[Event] | None:
    """Validate a conversation's stored bodies, joined in seq order into one JSON array, in a single
    pydantic-core call (a long log loads several times faster than event by event).

    The events, if they are exactly ``count``, numbered ``first_seq``, ``first_seq + 1``, ... in that order;
    else None: the caller then validates the bodies one by one (:func:`event_from_json`) to name the bad one.
    A body that is bad alone, or holds several values, changes the count or the seqs and so falls back,
    unless several bodies are damaged so as to make up for each other exactly (as a writer of valid events
    could as well: what is checked is that each event is valid and in its place).
    """
    try:
        with _collector_paused():
            events = _list_adapter.validate_json(text)
    except ValidationError:
        return None
    if len(events) != count or list(map(_seq_of, events)) != list(range(first_seq, first_seq + count)):  # C loops
        return None
    return events


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a long log's events are built.

    Validating 10,000 events makes some 35,000 tracked objects (each event, its fields set, its time zone, the
    ``__dict__`` of one holding a dict), none in a cycle; the collector, run every 700 allocations, traverses
    them again and again while they are built and, once enough survive, the whole heap (measured: about half
    the CPU time of such a load). Paused, it looks at them once, afterwards, unless a :class:`CollectorHold`
    keeps it paused until the replay has dropped them. Only a single synchronous pydantic-core call runs
    inside, so no other code of this thread runs with it paused unless a hold says so.
    """
    if not gc.isenabled():  # paused by someone else: theirs to resume
        yield
        return
    gc.disable()
    hold = _hold.get()
    built = False
    try:
        yield
        built = True
    finally:
        if built and hold is not None:
            hold.paused = True  # the holder resumes it
        else:
            gc.enable()


_hold: ContextVar[CollectorHold | None] = ContextVar("dynaprompt_collector_hold", default=None)


class CollectorHold:
    """Keeps the collector paused after a load (see :func:`_collector_paused`) until :meth:`resume`.

    The collector's first pass after a long log is loaded walks every object the load made (measured: 16 to
    22 ms for 10,000 events on a loaded machine, a fifth of a cold resume, and about 8 ms at a quiet moment),
    and a cold resume drops them all a few milliseconds later, when its replay has read them. The runner
    holds the collector paused from the load to that point: the events are then freed without ever being
    walked. Within it run the runner's own code and the dialog's code being replayed: a dialog does its I/O
    through ``call()``, which ends the advance, and the runner resumes the collector before it touches the
    store again (an async dialog awaiting something of its own lets other tasks run meanwhile, with the
    collector still paused). Nothing is exempted from collection: what is made meanwhile is seen at the next
    pass; only the pass is later.
    """

    __slots__ = ("paused",)

    def __init__(self) -> None:
        self.paused = False

    @contextmanager
    def loading(self) -> Iterator[CollectorHold]:
        """Within: a log this task loads leaves the collector paused (this hold resumes it)."""
        token = _hold.set(self)
        try:
            yield self
        finally:
            _hold.reset(token)

    def resume(self) -> None:
        """Resume the collector if a load under this hold left it paused; idempotent."""
        if self.paused:
            self.paused = False
            gc.enable()


def event_from_dict(conversation_id: str, seq: int, data: object) -> Event:
    """Like :func:`event_from_json`, for a decoded document (the MongoDB store)."""
    return _checked(conversation_id, seq, lambda: _adapter.validate_python(data))


def _checked(conversation_id: str, seq: int, validate: Callable[[], Event]) -> Event:
    """Run ``validate`` and check the event is the one stored at ``seq``, else ``CorruptEventError``."""
    try:
        event = validate()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise CorruptEventError(conversation_id, seq, f"{where}: {first.get('msg')}") from exc
    if event.seq != seq:
        raise CorruptEventError(conversation_id, seq, f"it says seq {event.seq}")
    return event
