"""The pure replay engine: drive a dialog against its log, produce new events.

An :class:`Execution` holds one run of a conversation: the stack of live
generators (a dialog and its sub-dialogs), the log as far as it has read it,
and the queue of replies not yet consumed. ``extend()`` gives it events
(recorded ones after a load, or new inputs such as a reply), ``advance(now)``
drives the dialog as far as it can go and returns the new events to append.
While events remain unread, each effect the dialog yields must match the next
recorded one and takes its recorded result (replay); past the end of the log
(the frontier) effects are resolved against ``now`` and recorded. Warm running
and replay are one code path, which is what makes replay invisible.

No I/O happens here: a ``call()`` at the frontier is handed back to the caller
(``Advance.call``), which runs it and reports with ``record_call()``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError
from pydantic_core import TzInfo

from dynaprompt.dialogs import Dialog, Done, Frame
from dynaprompt.effects import (
    Call,
    Cancel,
    Effect,
    Send,
    SetTimezone,
    Sleep,
    SleepUntil,
    SubDialog,
    WaitForReply,
)
from dynaprompt.errors import (
    CallError,
    CorruptEventError,
    DynapromptError,
    NondeterminismError,
    NotJSONError,
    TimeParseError,
    UnknownTimeZoneError,
)
from dynaprompt.events import (
    INPUT_KINDS,
    Called,
    Cancelled,
    Completed,
    Delivered,
    EffectFailed,
    ErrorInfo,
    Event,
    Failed,
    NowRead,
    ReplyReceived,
    Sent,
    Sleeping,
    Started,
    SubEnded,
    SubStarted,
    TimerFired,
    TzSet,
    Waiting,
    build,
)
from dynaprompt.models import Reply, State
from dynaprompt.timeparse import parse_duration, parse_instant, zone

__all__ = ["Advance", "Execution", "message_id", "to_json"]

_json: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)
_T = TypeVar("_T", bound=BaseModel)
_REPLAYED_ERRORS: dict[str, type[DynapromptError]] = {
    "TimeParseError": TimeParseError,
    "UnknownTimeZoneError": UnknownTimeZoneError,
    "NotJSONError": NotJSONError,
}
_ENDED = ("completed", "failed")
_seq_of = attrgetter("seq")
_kind_of = attrgetter("kind")
_TIME_FIELDS = {"send": "at", "wait_for_reply": "timeout", "sleep": "duration", "sleep_until": "when"}


def message_id(conversation_id: str, seq: int) -> str:
    """The id of the message recorded at ``seq``: stable, so it is an idempotency key."""
    return f"{conversation_id}:{seq}"


def to_json(value: Any, what: str) -> JsonValue:
    """``value`` checked to be JSON-compatible (tuples become lists), or ``NotJSONError``."""
    try:
        return _json.validate_python(value)
    except ValidationError as exc:
        raise NotJSONError(what, f"{type(value).__name__} value {value!r:.80}") from exc


@dataclass
class Advance:
    """What one ``advance()`` produced."""

    events: list[Event]
    state: State
    wake_at: datetime | None = None
    call: Call | None = None
    result: JsonValue = None
    error: ErrorInfo | None = None


@dataclass(slots=True)
class Execution:
    """One run of a conversation, resumable from its log. Not thread-safe; one owner at a time.

    Slotted: no ``__dict__`` per execution, one tracked object fewer for each the cache keeps (a full
    collection of the cyclic garbage collector visits every one of them).
    """

    conversation_id: str
    dialog: Dialog
    started: Started
    frames: list[Frame] = field(default_factory=list)
    log: list[Event] = field(default_factory=list)
    cursor: int = 0
    last_seq: int = 0
    inbox: deque[ReplyReceived] = field(default_factory=deque)
    outbox: dict[str, Sent] = field(default_factory=dict)
    tz: str = "UTC"
    state: State = "running"
    result: JsonValue = None
    error: ErrorInfo | None = None
    _pending: Waiting | Sleeping | None = None  # the recorded wait or sleep the top frame is blocked on
    _awaiting_call: Call | None = None
    _feed: tuple[Any, BaseException | None] | None = None
    _begun: bool = False
    _new: list[Event] = field(default_factory=list)
    # Effect and outcome events (not inputs) in the log so far: the place of the next effect in the run. Counted,
    # because ``log`` only keeps what is still unread (see ``_outcome``).
    effect_events: int = 0
    # Set by an advance that stopped at a timer already due because sends fell due before it (the timer's
    # instant): the runner hands over the sends due by then first, as an on-time runner would have, then
    # advances again.
    deliver_first: datetime | None = None

    @classmethod
    def begin(cls, conversation_id: str, dialog: Dialog, started: Started, history: Sequence[Event] = ()) -> Execution:
        """An execution of the run that ``started`` opens; ``history`` is the log before it."""
        execution = cls(conversation_id, dialog, started, tz=started.tz, last_seq=started.seq)
        for event in history:
            execution._track_outbox(event)
        execution.log.append(started)
        execution.cursor = 1
        return execution

    # -- feeding the log ---------------------------------------------------

    def extend(self, events: list[Event]) -> None:
        """Add events that follow the log read so far (recorded ones, or new inputs)."""
        last_seq = self.last_seq
        start = 0
        while start < len(events) and events[start].seq <= last_seq:
            start += 1
        taken = events[start:] if start else events
        # The usual case, a run of consecutive seqs (a whole log after a load), checked and counted in C loops.
        if list(map(_seq_of, taken)) == list(range(last_seq + 1, last_seq + 1 + len(taken))):
            self.log.extend(taken)
            self.last_seq = last_seq + len(taken)
            self.effect_events += len(taken) - sum(map(INPUT_KINDS.__contains__, map(_kind_of, taken)))
            return
        append = self.log.append
        effect_events = 0
        try:
            for event in taken:
                seq = event.seq
                if seq <= last_seq:
                    continue
                if seq != last_seq + 1:
                    raise CorruptEventError(self.conversation_id, seq, f"expected seq {last_seq + 1}")
                append(event)
                last_seq = seq
                if event.kind not in INPUT_KINDS:
                    effect_events += 1
        finally:  # what was taken before a bad event stays taken, as when it was counted event by event
            self.last_seq = last_seq
            self.effect_events += effect_events

    def input_reply(self, text: str, metadata: dict[str, JsonValue], now: datetime) -> ReplyReceived:
        """Record an inbound message at the next sequence number."""
        at = _read_back_time(now)
        if at is not None and not metadata and _encodes(text):
            reply = build(ReplyReceived, seq=self.last_seq + 1, at=at, text=text, metadata={})
        else:
            reply = _as_read_back(ReplyReceived(seq=self.last_seq + 1, at=now, text=text, metadata=metadata))
        self._record_input(reply)
        return reply

    def mark_delivered(self, message_ids: list[str], now: datetime) -> list[Event]:
        """Record that these outbox messages were handed to the channel; return the events to append."""
        events: list[Event] = []
        for mid in message_ids:
            delivered = build(Delivered, seq=self.last_seq + 1, at=now, message_id=mid)
            self._record_input(delivered)
            events.append(delivered)
        self._new = [event for event in self._new if event.kind != "delivered"]
        return events

    def due_messages(self, now: datetime) -> list[Sent]:
        """Recorded sends not yet delivered whose time has come, in due order."""
        due = [sent for sent in self.outbox.values() if (sent.due_at or sent.at) <= now]
        return sorted(due, key=lambda sent: (sent.due_at or sent.at, sent.seq))

    def next_message_at(self) -> datetime | None:
        times = [sent.due_at or sent.at for sent in self.outbox.values()]
        return min(times) if times else None

    def take_new_events(self) -> list[Event]:
        """Events recorded since the last call, for the caller to append."""
        new, self._new = self._new, []
        return new

    # -- driving -------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.state in ("completed", "failed")

    def record_call(self, result: Any, error: BaseException | None, now: datetime, attempts: int = 1) -> None:
        """Report how the ``call()`` handed out by ``advance()`` went."""
        effect = self._awaiting_call
        assert effect is not None, "record_call() without a pending call"
        self._awaiting_call = None
        if error is None:
            try:
                value = to_json(result, f"the result of {effect.name}")
            except NotJSONError as exc:
                error = exc
        if error is not None:
            info = ErrorInfo.of(error)
            self._record(Called(seq=self.last_seq + 1, at=now, name=effect.name, error=info, attempts=attempts))
            self._feed = (None, CallError(info.type, info.message))
        else:
            self._record(Called(seq=self.last_seq + 1, at=now, name=effect.name, result=value, attempts=attempts))
            self._feed = (value, None)

    async def advance(self, now: datetime) -> Advance:
        """Drive the dialog until it blocks, ends, or needs a call run; return what happened.

        Raises ``NondeterminismError`` (and records nothing more) when the code
        yields something other than the log holds.
        """
        self.deliver_first = None
        if self._awaiting_call is not None:
            return self._outcome("running", call=self._awaiting_call)
        while self.state not in _ENDED:
            if not self._begun:
                self._begun = True
                self.frames.append(self.dialog.open(self.started.args, self.started.kwargs))
                await self._step(None, None, now)
                continue
            if self._pending is not None:
                if not self._resolve_pending(now):
                    return self._blocked_outcome()
                continue
            feed = self._feed
            if feed is not None:
                self._feed = None
                frame = self.frames[-1]
                if not frame.is_async:  # the common case, stepped without a coroutine per effect
                    step, handle = frame.step, self._handle
                    # Effect after effect for as long as each one's result is at hand (a replayed send, a wait
                    # answered by the next recorded reply); anything else goes round the loop above.
                    while True:
                        try:
                            effect = step(*feed)
                        except Done as done:
                            await self._frame_ended(done.value, None, now)
                            break
                        except NondeterminismError:
                            raise
                        except Exception as raised:  # the dialog's own code raised
                            await self._frame_ended(None, raised, now)
                            break
                        handle(effect, now)
                        feed = self._feed
                        if feed is None or self._pending is not None or self.frames[-1] is not frame:
                            break
                        self._feed = None
                    continue
                await self._step(*feed, now)
                continue
            if self._awaiting_call is not None:
                return self._outcome("running", call=self._awaiting_call)
            raise AssertionError("execution has nothing to do")  # pragma: no cover
        # Inputs recorded after the run ended (a scheduled send delivered later) still count: without
        # them a replayed execution would think those messages undelivered and hand them over again.
        while self.cursor < len(self.log) and self._absorb(self.log[self.cursor]):
            self.cursor += 1
        return self._outcome(self.state)

    async def close(self) -> None:
        """Close every live generator (the execution is being dropped)."""
        while self.frames:
            await self.frames.pop().close()

    # -- internals -----------------------------------------------------------

    async def _step(self, value: Any, exc: BaseException | None, now: datetime) -> None:
        """Send ``value`` (or throw ``exc``) into the top frame and handle what it yields or how it ends."""
        frame = self.frames[-1]
        try:
            if frame.is_async:
                effect = await (frame.throw(exc) if exc is not None else frame.send(value))
            else:
                effect = frame.step(value, exc)
        except Done as done:
            await self._frame_ended(done.value, None, now)
            return
        except NondeterminismError:
            raise
        except Exception as raised:  # the dialog's own code raised
            await self._frame_ended(None, raised, now)
            return
        self._handle(effect, now)

    async def _frame_ended(self, value: Any, exc: BaseException | None, now: datetime) -> None:
        """The top frame returned ``value`` or raised ``exc``: close it and record how it ended."""
        frame = self.frames.pop()
        await frame.close()
        seq = self.last_seq + 1
        if exc is None:
            try:
                result = to_json(value, f"the result of dialog {frame.dialog.name!r}")
            except NotJSONError as not_json:
                exc, result = not_json, None
        info = ErrorInfo.of(exc) if exc is not None else None
        if self.frames:  # a sub-dialog ended: hand its result (or error) to the parent
            if info is not None:
                ended: Event = build(SubEnded, seq=seq, at=now, dialog=frame.dialog.name, result=None, error=info)
            else:  # ``result`` is to_json's own copy: nothing else holds it
                ended = build(SubEnded, seq=seq, at=now, dialog=frame.dialog.name, result=result, error=None)
            self._match_or_record(ended, f"end of sub-dialog {frame.dialog.name}")
            self._feed = (None, exc) if exc is not None else (result, None)
            return
        if info is not None:
            self._match_or_record(build(Failed, seq=seq, at=now, error=info), "failure of the dialog")
            self.state, self.error = "failed", info
        else:
            self._match_or_record(build(Completed, seq=seq, at=now, result=result), "end of the dialog")
            self.state, self.result = "completed", result

    def _handle(self, effect: Effect, now: datetime) -> None:
        """Resolve a yielded effect from the log (replay) or against ``now`` (frontier)."""
        # The loop of _next_recorded and _absorb inlined, with sends and waits (most of a long log) matched
        # here: replaying 10,000 events is this loop 10,000 times.
        log = self.log
        cursor = self.cursor
        end = len(log)
        while cursor < end:
            recorded = log[cursor]
            cursor += 1
            kind = recorded.kind
            if kind == "reply":
                self.inbox.append(recorded)  # type: ignore[arg-type]
                continue
            if kind == "delivered":
                self.outbox.pop(recorded.message_id, None)  # type: ignore[union-attr]
                continue
            if kind == "timer_fired":
                continue  # a timer for an effect already resolved (a duplicate fire)
            self.cursor = cursor
            effect_type = type(effect)
            if kind == "sent" and effect_type is Send and recorded.text == effect.text:  # type: ignore[union-attr,attr-defined]
                mid = f"{self.conversation_id}:{recorded.seq}"
                self.outbox[mid] = recorded  # type: ignore[assignment]
                self._feed = (mid, None)
            elif kind == "waiting" and effect_type is WaitForReply:
                # The usual wait: no reply queued, and the next recorded input other than deliveries is a reply
                # that answers it. Consumed here, as _resolve_pending would do at once; anything else is left
                # to it, from where this stopped.
                if not self.inbox:
                    while cursor < end and log[cursor].kind == "delivered":
                        self.outbox.pop(log[cursor].message_id, None)  # type: ignore[union-attr]
                        cursor += 1
                    self.cursor = cursor
                    if cursor < end:
                        reply = log[cursor]
                        if reply.kind == "reply" and _answers(recorded, reply):  # type: ignore[arg-type]
                            self.cursor = cursor + 1
                            self._feed = (self._reply(reply), None)
                            return
                self._pending = recorded  # type: ignore[assignment]
            else:
                self._check_match(recorded, effect)
                self._replay_result(recorded, effect)
            return
        self.cursor = cursor
        try:
            self._resolve_new(effect, now)
        except (TimeParseError, UnknownTimeZoneError, NotJSONError) as exc:
            self._record(EffectFailed(seq=self.last_seq + 1, at=now, effect=effect.kind, error=ErrorInfo.of(exc)))
            self._feed = (None, exc)

    def _resolve_new(self, effect: Effect, now: datetime) -> None:
        seq = self.last_seq + 1
        kind = effect.kind  # compared as strings: isinstance() on a pydantic class goes through ABCMeta
        if kind == "send":
            assert isinstance(effect, Send)
            due_at = None
            if effect.at is not None:
                due_at = parse_instant(effect.at, now, self.tz)
            if effect.metadata:  # the effect's own dict: the event gets a validated copy
                sent = Sent(seq=seq, at=now, text=effect.text, to=effect.to, metadata=effect.metadata, due_at=due_at)
            else:
                sent = build(Sent, seq=seq, at=now, text=effect.text, to=effect.to, metadata={}, due_at=due_at)
            self._record(sent)
            self._feed = (message_id(self.conversation_id, seq), None)
        elif kind == "wait_for_reply":
            assert isinstance(effect, WaitForReply)
            timeout_at = None if effect.timeout is None else now + parse_duration(effect.timeout)
            self._record(build(Waiting, seq=seq, at=now, timeout_at=timeout_at))
            self._pending = self.log[-1]  # type: ignore[assignment]
        elif kind == "sleep_until" or kind == "sleep":
            if kind == "sleep_until":
                assert isinstance(effect, SleepUntil)
                until = parse_instant(effect.when, now, self.tz)
            else:
                assert isinstance(effect, Sleep)
                until = now + parse_duration(effect.duration)
            self._pending = self._record(_sleeping(seq, now, effect.kind, until))  # type: ignore[arg-type]
        elif kind == "now":
            at = _read_back_time(now)
            if at is not None:
                read = self._record(build(NowRead, seq=seq, at=at, value=at))
            else:
                read = self._record(_as_read_back(NowRead(seq=seq, at=now, value=now)))
            self._feed = (read.value, None)
        elif isinstance(effect, Call):
            self._awaiting_call = effect
        elif isinstance(effect, SubDialog):
            args = to_json(list(effect.arguments), f"the arguments of {effect.dialog.name}")
            kwargs = to_json(effect.keywords, f"the keyword arguments of {effect.dialog.name}")
            self._record(SubStarted(seq=seq, at=now, dialog=effect.dialog.name, args=args, kwargs=kwargs))
            self.frames.append(effect.dialog.open(effect.arguments, effect.keywords))
            self._feed = (None, None)
        elif isinstance(effect, Cancel):
            ok = self.outbox.pop(effect.message_id, None) is not None
            self._record(Cancelled(seq=seq, at=now, message_id=effect.message_id, ok=ok))
            self._feed = (ok, None)
        elif isinstance(effect, SetTimezone):
            zone(effect.zone)
            self._record(TzSet(seq=seq, at=now, zone=effect.zone))
            self.tz = effect.zone
            self._feed = (None, None)
        else:  # pragma: no cover - every effect class is handled above
            raise DynapromptError(f"unknown effect {effect!r}")

    def _replay_result(self, recorded: Event, effect: Effect) -> None:
        if isinstance(recorded, EffectFailed):
            self._feed = (None, _replayed_error(recorded, effect))
        elif isinstance(recorded, Sent):
            self._feed = (message_id(self.conversation_id, recorded.seq), None)
        elif isinstance(recorded, Waiting | Sleeping):
            self._pending = recorded
        elif isinstance(recorded, NowRead):
            self._feed = (recorded.value, None)
        elif isinstance(recorded, Called):
            if recorded.error is not None:
                self._feed = (None, CallError(recorded.error.type, recorded.error.message))
            else:
                self._feed = (recorded.result, None)
        elif isinstance(recorded, SubStarted):
            assert isinstance(effect, SubDialog)
            self.frames.append(effect.dialog.open(effect.arguments, effect.keywords))
            self._feed = (None, None)
        elif isinstance(recorded, Cancelled):
            self._feed = (recorded.ok, None)
        elif isinstance(recorded, TzSet):
            self.tz = recorded.zone
            self._feed = (None, None)

    def _resolve_pending(self, now: datetime) -> bool:
        """Try to end the current wait or sleep; True if it ended (and the result is fed)."""
        assert self._pending is not None
        blocked = self._pending
        waiting = blocked.kind == "waiting"
        if waiting and self.inbox and _answers(blocked, self.inbox[0]):  # type: ignore[arg-type]
            self._pending = None
            self._feed = (self._reply(self.inbox.popleft()), None)
            return True
        log = self.log
        while self.cursor < len(log):
            event = log[self.cursor]
            self.cursor += 1
            kind = event.kind
            if kind == "reply" and waiting:
                if not _answers(blocked, event):  # type: ignore[arg-type]
                    self.inbox.append(event)  # type: ignore[arg-type]  # it queues behind the overdue timeout
                    continue
                self._pending = None
                self._feed = (self._reply(event), None)  # type: ignore[arg-type]
                return True
            if kind == "timer_fired" and event.for_seq == blocked.seq:  # type: ignore[union-attr]
                self._pending = None
                self._feed = (None if waiting else blocked.until, None)  # type: ignore[union-attr]
                return True
            if kind == "delivered":
                self.outbox.pop(event.message_id, None)  # type: ignore[union-attr]
                continue
            if not self._absorb(event):
                raise CorruptEventError(
                    self.conversation_id,
                    event.seq,
                    f"{event.kind} recorded while the dialog waited at seq {blocked.seq}",
                )
        deadline = blocked.timeout_at if isinstance(blocked, Waiting) else blocked.until
        if deadline is not None and deadline <= now:
            # Caught up late (no runner was up at the deadline): a scheduled send due at or before the deadline
            # was due first, so it is handed over before the timer fires and the dialog goes on (a cancel after
            # the sleep must find it delivered). Decided from the log alone, so a replay decides the same.
            # Immediate sends are handed over as they are recorded; one a channel refused does not hold
            # the timer up.
            first = min((sent.due_at for sent in self.outbox.values() if sent.due_at is not None), default=None)
            if first is not None and first <= deadline:
                self.deliver_first = deadline
                return False
            self._record(build(TimerFired, seq=self.last_seq + 1, at=now, for_seq=blocked.seq))
            self.cursor = len(self.log)
            self._pending = None
            self._feed = (None if isinstance(blocked, Waiting) else blocked.until, None)
            return True
        return False

    def _blocked_outcome(self) -> Advance:
        assert self._pending is not None
        blocked = self._pending
        if isinstance(blocked, Waiting):
            return self._outcome("waiting_for_reply", wake_at=blocked.timeout_at)
        return self._outcome("sleeping", wake_at=blocked.until)

    def _outcome(self, state: State, *, wake_at: datetime | None = None, call: Call | None = None) -> Advance:
        self.state = state
        # What replay has read is never read again: drop it, so a cached execution holds its frames, inbox and
        # outbox, not its whole history (an idle conversation in the cache stays small however long its log).
        del self.log[: self.cursor]
        self.cursor = 0
        return Advance(self.take_new_events(), state, wake_at, call, self.result, self.error)

    def wake_at(self) -> datetime | None:
        """When this conversation next needs the runner: a timer or a scheduled send."""
        times = []
        if self._pending is not None and not self.ended:
            blocked = self._pending
            deadline = blocked.timeout_at if isinstance(blocked, Waiting) else blocked.until
            if deadline is not None:
                times.append(deadline)
        message_at = self.next_message_at()
        if message_at is not None:
            times.append(message_at)
        return min(times) if times else None

    def _next_recorded(self) -> Event | None:
        """Absorb inputs up to the next recorded effect or outcome event; None at the frontier."""
        while self.cursor < len(self.log):
            event = self.log[self.cursor]
            if self._absorb(event):
                self.cursor += 1
                continue
            self.cursor += 1
            return event
        return None

    def _absorb(self, event: Event) -> bool:
        """Take in an input event; False if ``event`` is not an input."""
        kind = event.kind
        if kind == "reply":
            self.inbox.append(event)  # type: ignore[arg-type]
        elif kind == "delivered":
            self.outbox.pop(event.message_id, None)  # type: ignore[union-attr]
        elif kind != "timer_fired":  # a timer for an effect already resolved (a duplicate fire) is absorbed
            return False
        return True

    def _check_match(self, recorded: Event, effect: Effect) -> None:
        # The two commonest pairs are compared directly (replaying a long log builds no strings); the keys
        # decide every other pair, and name both sides when they differ.
        kind = recorded.kind
        if type(effect) is Send and kind == "sent":
            matches = recorded.text == effect.text  # type: ignore[union-attr]
        elif type(effect) is WaitForReply and kind == "waiting":
            matches = True
        elif kind == "effect_failed":
            matches = recorded.effect == effect.kind  # type: ignore[union-attr]
        else:
            matches = _recorded_key(recorded) == effect.key()
        if not matches:
            raise NondeterminismError(self.conversation_id, recorded.seq, _recorded_key(recorded), effect.describe())
        if kind == "sent" or kind == "cancelled":
            self._track_outbox(recorded)

    def _match_or_record(self, event: Event, description: str) -> None:
        recorded = self._next_recorded()
        if recorded is None:
            self._record(event)
            return
        if recorded.kind != event.kind or getattr(recorded, "dialog", None) != getattr(event, "dialog", None):
            raise NondeterminismError(self.conversation_id, recorded.seq, _recorded_key(recorded), description)

    def _record(self, event: Event) -> Any:
        if event.seq != self.last_seq + 1:  # pragma: no cover - internal invariant
            raise AssertionError(f"seq {event.seq} after {self.last_seq}")
        self.log.append(event)
        self.last_seq = event.seq
        self.cursor = len(self.log)
        self._new.append(event)
        self._track_outbox(event)
        if event.kind not in INPUT_KINDS:
            self.effect_events += 1
        return event

    def _record_input(self, event: Event) -> None:
        """Append an input at the next seq without moving the read cursor: the dialog reads it in turn."""
        self.log.append(event)
        self.last_seq = event.seq
        self._new.append(event)
        self._track_outbox(event)

    def _track_outbox(self, event: Event) -> None:
        kind = event.kind  # by kind: isinstance() on a pydantic class goes through ABCMeta
        if kind == "sent":
            self.outbox[f"{self.conversation_id}:{event.seq}"] = event  # type: ignore[assignment]
        elif kind == "delivered" or (kind == "cancelled" and event.ok):  # type: ignore[union-attr]
            self.outbox.pop(event.message_id, None)  # type: ignore[union-attr]

    def _reply(self, event: ReplyReceived) -> Reply:
        if not event.metadata:  # nothing to copy: built without validating the event's values again
            return build(Reply, id=f"{self.conversation_id}:{event.seq}", text=event.text, at=event.at, metadata={})
        return Reply(
            id=message_id(self.conversation_id, event.seq), text=event.text, at=event.at, metadata=event.metadata
        )


def _answers(wait: Waiting, reply: ReplyReceived) -> bool:
    """Whether ``reply`` ends ``wait``. One queued before the wait began always does; one that came during
    it only if it came before the timeout. So a reply that finds an overdue timeout not yet fired (no
    runner was up at that instant) queues behind it, as it would had the timer fired on time; the rule
    reads only recorded values, so a replay decides the same."""
    return reply.seq < wait.seq or wait.timeout_at is None or reply.at < wait.timeout_at


def _replayed_error(recorded: EffectFailed, effect: Effect) -> Exception:
    """The error a failed effect raised, rebuilt from the log with the attributes its constructor sets,
    so a dialog that reads ``exc.text`` or ``exc.zone`` sees the same thing on replay."""
    error_type = _REPLAYED_ERRORS.get(recorded.error.type, DynapromptError)
    exc = error_type.__new__(error_type)
    Exception.__init__(exc, recorded.error.message)
    if isinstance(exc, TimeParseError):
        spec = getattr(effect, _TIME_FIELDS.get(effect.kind, "when"))
        exc.text = spec if isinstance(spec, str) else repr(spec)
    elif isinstance(exc, UnknownTimeZoneError):
        exc.zone = getattr(effect, "zone", "")
    return exc


def _read_back_time(value: datetime) -> datetime | None:
    """``value`` as the log gives it back (pydantic's ``TzInfo`` of the same offset, ``fold`` 0), without the
    JSON round trip; None when only the round trip is sure to give the same (naive, odd offset, subclass)."""
    if type(value) is not datetime:
        return None
    offset = value.utcoffset()
    if offset is None or offset.microseconds or offset.seconds % 60:
        return None
    return value.replace(tzinfo=TzInfo(offset.days * 86_400 + offset.seconds), fold=0)


def _encodes(text: str) -> bool:
    """Whether ``text`` survives JSON unchanged (a lone surrogate does not; the round trip then raises)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _sleeping(seq: int, now: datetime, effect: Literal["sleep", "sleep_until"], until: datetime) -> Sleeping:
    at, read_until = _read_back_time(now), _read_back_time(until)
    if at is None or read_until is None:
        return _as_read_back(Sleeping(seq=seq, at=now, effect=effect, until=until))
    return build(Sleeping, seq=seq, at=at, effect=effect, until=read_until)


def _as_read_back(event: _T) -> _T:
    """``event`` as it will read back from the log, so the warm run hands the dialog the very
    values (time zones included) that a replay will."""
    # The serializer and validator directly: the same round trip as model_validate_json(model_dump_json()),
    # without their Python wrappers (this runs for every reply).
    return type(event).__pydantic_validator__.validate_json(event.__pydantic_serializer__.to_json(event))  # type: ignore[no-any-return]


def _recorded_key(event: Event) -> str:
    """How replay describes a recorded event, in the terms of ``Effect.key()``."""
    if isinstance(event, Sent):
        return f"send({event.text!r})"
    if isinstance(event, Waiting):
        return "wait_for_reply()"
    if isinstance(event, Sleeping):
        return f"{event.effect}()"
    if isinstance(event, NowRead):
        return "now()"
    if isinstance(event, Called):
        return f"call({event.name})"
    if isinstance(event, SubStarted):
        return f"{event.dialog}(...)"
    if isinstance(event, Cancelled):
        return f"cancel({event.message_id!r})"
    if isinstance(event, TzSet):
        return f"set_timezone({event.zone!r})"
    if isinstance(event, EffectFailed):
        return f"{event.effect} (which failed: {event.error})"
    if isinstance(event, SubEnded):
        return f"end of sub-dialog {event.dialog}"
    if isinstance(event, Completed):
        return "end of the dialog"
    if isinstance(event, Failed):
        return "failure of the dialog"
    return event.kind
