"""Effects: the inert, frozen values a dialog yields.

Nothing happens when an effect is built; the runner interprets it. The value
of the ``yield`` is the effect's result::

    message_id = yield send("Hello!")
    reply = yield wait_for_reply(timeout="2 hours")
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from dynaprompt.errors import InvalidInputError, NotTextError
from dynaprompt.events import build

__all__ = [
    "Call",
    "Cancel",
    "Effect",
    "Finish",
    "Now",
    "SetTimezone",
    "Sleep",
    "SleepUntil",
    "SubDialog",
    "WaitForReply",
    "call",
    "cancel",
    "finish",
    "now",
    "send",
    "set_timezone",
    "sleep",
    "sleep_until",
    "wait_for_reply",
]

TimeSpec = datetime | str
DurationSpec = timedelta | float | str


class Effect(BaseModel):
    """Base of every effect. ``kind`` names it in the log."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    kind: ClassVar[str]

    def key(self) -> str:
        """What replay compares with the log: the kind and the effect's identity."""
        return self.kind

    def describe(self) -> str:
        return self.key()


class Send(Effect):
    """Record and deliver a message; see :func:`send`."""

    kind: ClassVar[str] = "send"
    text: str
    at: TimeSpec | None = None
    to: str | None = None
    metadata: dict[str, JsonValue] = {}

    def key(self) -> str:
        return f"send({self.text!r})"


class WaitForReply(Effect):
    """Wait for the next inbound message; see :func:`wait_for_reply`."""

    kind: ClassVar[str] = "wait_for_reply"
    timeout: DurationSpec | None = None

    def key(self) -> str:
        return "wait_for_reply()"


class SleepUntil(Effect):
    """Sleep until an instant; see :func:`sleep_until`."""

    kind: ClassVar[str] = "sleep_until"
    when: TimeSpec

    def key(self) -> str:
        return "sleep_until()"

    def describe(self) -> str:
        return f"sleep_until({self.when!r})"


class Sleep(Effect):
    """Sleep for a duration; see :func:`sleep`."""

    kind: ClassVar[str] = "sleep"
    duration: DurationSpec

    def key(self) -> str:
        return "sleep()"

    def describe(self) -> str:
        return f"sleep({self.duration!r})"


class Now(Effect):
    """Read the clock; see :func:`now`."""

    kind: ClassVar[str] = "now"

    def key(self) -> str:
        return "now()"


class Call(Effect):
    """Run a side-effecting function once; see :func:`call`."""

    kind: ClassVar[str] = "call"
    fn: Callable[..., Any]
    arguments: tuple[Any, ...] = ()
    keywords: dict[str, Any] = {}
    retries: int = 0
    retry_delay: float = 1.0

    @property
    def name(self) -> str:
        fn = self.fn
        module = getattr(fn, "__module__", None) or ""
        qualname = getattr(fn, "__qualname__", None) or repr(fn)
        return f"{module}:{qualname}" if module else qualname

    def key(self) -> str:
        return f"call({self.name})"

    def with_retries(self, retries: int, *, delay: float = 1.0) -> Call:
        """The same call, tried up to ``retries`` more times on failure, ``delay`` seconds apart
        (doubling each time) before ``CallError`` is raised in the dialog."""
        return self.model_copy(update={"retries": retries, "retry_delay": delay})


class SubDialog(Effect):
    """Run another dialog inside this one; produced by calling a ``@dialog`` function."""

    kind: ClassVar[str] = "sub_dialog"
    dialog: Any
    arguments: tuple[Any, ...] = ()
    keywords: dict[str, Any] = {}

    def key(self) -> str:
        return f"{self.dialog.name}(...)"


class Finish(Effect):
    """End the current dialog (or sub-dialog) with a result; see :func:`finish`."""

    kind: ClassVar[str] = "finish"
    value: JsonValue = None

    def key(self) -> str:
        return "finish()"


class Cancel(Effect):
    """Cancel a scheduled send; see :func:`cancel`."""

    kind: ClassVar[str] = "cancel"
    message_id: str

    def key(self) -> str:
        return f"cancel({self.message_id!r})"


class SetTimezone(Effect):
    """Set the conversation's time zone; see :func:`set_timezone`."""

    kind: ClassVar[str] = "set_timezone"
    zone: str

    def key(self) -> str:
        return f"set_timezone({self.zone!r})"


# The constructors below build an effect without validating it again when every value already has its field's
# exact type (``events.build``): replaying a long log runs a dialog's code, and so these, once per recorded
# effect. Any other value goes through the validating constructor, as before. Effects without fields (or with
# their defaults) are immutable, so one instance serves every call.
_WAIT_FOR_REPLY = WaitForReply(timeout=None)
_E = TypeVar("_E", bound=Effect)


def _validated(cls: type[_E], call: str, **values: Any) -> _E:
    """``cls(**values)``, with a value of the wrong kind reported as ``InvalidInputError`` naming the effect
    and the argument: a dialog's mistake gets one of the library's errors, not pydantic's ``ValidationError``."""
    try:
        return cls(**values)
    except ValidationError as exc:
        errors = exc.errors()
        argument = errors[0]["loc"][0] if errors[0]["loc"] else "argument"
        # A union (a time as datetime or phrase) fails once per alternative: say each.
        reasons = dict.fromkeys(e["msg"] for e in errors if e["loc"][:1] == (argument,))
        raise InvalidInputError(f"{call}(): {argument}={errors[0]['input']!r:.80}: {'; or '.join(reasons)}") from None


_NOW = Now()


def send(
    text: str,
    *,
    at: TimeSpec | None = None,
    to: str | None = None,
    metadata: dict[str, JsonValue] | None = None,
) -> Send:
    """Send ``text`` to the user; the result is the message id (a str).

    With ``at`` (an aware datetime or a phrase such as ``"tomorrow at 9am"``)
    the message is scheduled: it is recorded now, delivered when due, and the
    dialog goes on at once. ``to`` names another recipient for the channel.

    >>> send("Hi there!").text
    'Hi there!'
    """
    if not isinstance(text, str):
        raise NotTextError(text)
    if at is None and not metadata and type(text) is str and (to is None or type(to) is str):
        return build(Send, text=text, at=None, to=to, metadata={})  # the common case: nothing to validate
    if at is not None and not isinstance(at, datetime | str):
        raise InvalidInputError(f"send(at=...) takes a datetime or a string, not {type(at).__name__}")
    return _validated(Send, "send", text=text, at=at, to=to, metadata=metadata or {})


def wait_for_reply(*, timeout: DurationSpec | None = None) -> WaitForReply:
    """Wait for the next unconsumed inbound message.

    The result is a :class:`~dynaprompt.Reply`, or ``None`` when ``timeout``
    (a timedelta, seconds, or a phrase such as ``"2 hours"``) passes first.
    Replies that arrived while the dialog was busy are queued and consumed in
    the order the store recorded them.
    """
    if timeout is None:
        return _WAIT_FOR_REPLY
    return _validated(WaitForReply, "wait_for_reply", timeout=timeout)


def sleep_until(when: TimeSpec) -> SleepUntil:
    """Sleep until ``when``: an aware datetime or a phrase such as ``"tomorrow at 9am"``.

    The phrase is resolved once, against the runner's clock and the
    conversation's time zone, and the instant is recorded; the result is that
    instant. A past instant returns at once.
    """
    if type(when) is str or type(when) is datetime:
        return build(SleepUntil, when=when)
    if isinstance(when, int | float):  # not read as a Unix time, as pydantic would: say what is wrong
        raise InvalidInputError(f"sleep_until(when=...) takes a datetime or a string, not {type(when).__name__}")
    return _validated(SleepUntil, "sleep_until", when=when)


def sleep(duration: DurationSpec) -> Sleep:
    """Sleep for ``duration`` (a timedelta, seconds, or ``"90 minutes"``); the result is the wake instant."""
    if type(duration) is str or type(duration) is timedelta or type(duration) is float:
        return build(Sleep, duration=duration)
    return _validated(Sleep, "sleep", duration=duration)


def now() -> Now:
    """The current instant (aware), recorded so that replay sees the same value."""
    return _NOW


def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Call:
    """Run ``fn(*args, **kwargs)`` (sync or async) once and record its JSON-compatible result.

    Replay returns the recorded result and never calls ``fn`` again. If ``fn``
    raises, :class:`~dynaprompt.CallError` is raised inside the dialog (after
    ``.with_retries(n)`` more tries, if asked for), in the warm run and on
    replay alike::

        number = yield call(random.randint, 1, 100)
    """
    if not callable(fn):
        raise InvalidInputError(f"call() needs a callable, not {type(fn).__name__}")
    return build(Call, fn=fn, arguments=args, keywords=kwargs)  # the call's own tuple and dict


def finish(value: JsonValue = None) -> Finish:
    """End the dialog with ``value`` as its result (a sub-dialog's ``yield`` returns it)."""
    return _validated(Finish, "finish", value=value)


def cancel(message_id: str) -> Cancel:
    """Cancel a scheduled ``send`` not yet delivered; the result is ``True`` if it was cancelled."""
    if type(message_id) is str:
        return build(Cancel, message_id=message_id)
    return _validated(Cancel, "cancel", message_id=message_id)


def set_timezone(zone: str) -> SetTimezone:
    """Use the IANA zone ``zone`` for every later natural-language time in this conversation.

    >>> set_timezone("Europe/London").zone
    'Europe/London'
    """
    if type(zone) is str:
        return build(SetTimezone, zone=zone)
    return _validated(SetTimezone, "set_timezone", zone=zone)
