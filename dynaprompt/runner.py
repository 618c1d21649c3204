"""The runner: load a conversation, replay it, append what it did, hand off its messages.

Every advance of a conversation (``start``, ``deliver``, a due timer) runs
under a lease in the store, so many runners may share one store and only one
advances a given conversation at a time. The lease is held only while the
conversation is being advanced. A cache of live executions lets a warm
conversation skip replay; it is only a cache: its entry is used when it ends
exactly where the log ends, and is otherwise caught up from the log or rebuilt.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import islice
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from dynaprompt import scheduling
from dynaprompt.channels.base import Channel
from dynaprompt.clock import Clock, SystemClock
from dynaprompt.dialogs import Dialog, lookup
from dynaprompt.effects import Call
from dynaprompt.errors import (
    ConflictError,
    ConversationEndedError,
    ConversationExistsError,
    DynapromptError,
    InvalidInputError,
    MessageTooLargeError,
    NondeterminismError,
    NotTextError,
    ScheduleError,
    StoreError,
    UnknownConversationError,
)
from dynaprompt.events import (
    INPUT_KINDS,
    CollectorHold,
    Delivered,
    ErrorInfo,
    Event,
    Failed,
    ReplyReceived,
    Sent,
    Started,
    build,
)
from dynaprompt.models import Message, Schedule, Status, TranscriptEntry
from dynaprompt.replay import Execution, message_id, to_json
from dynaprompt.stores.base import Claim, ConversationRow, RowUpdate, Store
from dynaprompt.timeparse import zone

__all__ = ["Runner"]

log = logging.getLogger("dynaprompt")

_ENDED = ("completed", "failed")
_MAX_ATTEMPTS = 50
_FLUSH_CLEARS = frozenset({"wake_at", "result", "error"})


class Runner:
    """Runs conversations on a store, handing the bot's messages to a channel.

    ::

        store = await open_store("sqlite:///bot.db")
        async with Runner(store, channel) as runner:
            await runner.start(check_in, "user-42", "Ann")
            await runner.deliver("user-42", "Slept well!")

    Options (keyword-only):

    * ``clock``: where time comes from (default: the system clock);
      ``dynaprompt.testing.VirtualClock`` for tests.
    * ``tz``: the default IANA zone of new conversations (default ``"UTC"``).
    * ``max_message_chars``: the longest inbound message accepted (16,000).
    * ``cache_size``: how many live conversations to keep warm (1,024, or the
      ``DYNAPROMPT_CACHE_SIZE`` environment variable; 0 turns the cache off,
      so every advance replays from the log).
    * ``lease_seconds``: how long a claim on a conversation lasts if this
      runner dies while advancing it (30 s).
    * ``poll_interval``: how often ``serve()`` looks for work other runners
      left (1 s).
    * ``due_batch``: how many due conversations one pass of ``run_due`` takes
      from the store at a time (256).
    * ``due_concurrency``: how many due conversations ``run_due`` advances at
      once (64); their writes share transactions where the store batches them.
    * ``pass_interval``: the shortest time, in seconds, between the starts of
      two passes of ``serve()`` (0.005). Wake-ups that fall due within it of
      each other are fired together, in one pass whose writes share
      transactions, instead of one pass each: a wake-up may come up to that
      much later, and a runner woken thousands of times a second spends about
      a quarter less CPU on each (see the docs on timers). Passes further apart
      than this are not delayed at all; 0 runs each pass as soon as it is due.

    The runner never closes a store it was given.
    """

    def __init__(
        self,
        store: Store,
        channel: Channel | None = None,
        *,
        clock: Clock | None = None,
        tz: str | None = None,
        max_message_chars: int = 16_000,
        cache_size: int | None = None,
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        due_batch: int = 256,
        due_concurrency: int = 64,
        pass_interval: float = 0.005,
        schedule_overlap: str = "skip",
        schedule_missed: str = "run_late",
        schedule_grace: timedelta | float = timedelta(hours=1),
        min_schedule_interval: timedelta | float = timedelta(minutes=1),
    ) -> None:
        self.store = store
        self.channel = channel
        self.clock: Clock = clock or SystemClock()
        self.tz = tz or "UTC"
        zone(self.tz)
        self.max_message_chars = max_message_chars
        self.cache_size = cache_size if cache_size is not None else _default_cache_size()
        self.lease = timedelta(seconds=lease_seconds)
        self.poll_interval = poll_interval
        self.due_batch = due_batch
        if due_concurrency < 1:
            raise InvalidInputError(f"due_concurrency must be at least 1, not {due_concurrency!r}")
        self.due_concurrency = due_concurrency
        if not pass_interval >= 0:
            raise InvalidInputError(f"pass_interval must be a number of seconds >= 0, not {pass_interval!r}")
        self.pass_interval = pass_interval
        if schedule_overlap not in scheduling.OVERLAP_POLICIES:
            raise ScheduleError(
                f"schedule_overlap must be one of {', '.join(scheduling.OVERLAP_POLICIES)}, not {schedule_overlap!r}"
            )
        if schedule_missed not in scheduling.MISSED_POLICIES:
            raise ScheduleError(
                f"schedule_missed must be one of {', '.join(scheduling.MISSED_POLICIES)}, not {schedule_missed!r}"
            )
        self.schedule_overlap = schedule_overlap
        self.schedule_missed = schedule_missed
        self.schedule_grace = _seconds(schedule_grace)
        self.min_schedule_interval = _seconds(min_schedule_interval)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._cache: OrderedDict[str, Execution] = OrderedDict()
        # Conversations being worked on: their waiters (None until one waits, so a wake-up allocates nothing).
        self._locks: dict[str, deque[anyio.Event] | None] = {}
        # serve() is asked to start a pass early (a reply to pick up, an earlier wake-up): _wake_serve sets the flag
        # and cancels serve's sleep, if it sleeps (its cancel scope).
        self._wake_requested = False
        self._serve_sleep: anyio.CancelScope | None = None
        # What serve() plans to sleep until (None: not sleeping on a plan, so any new wake-up wakes it), and the
        # earliest future wake-up this runner recorded since serve's pass began: see _note_wake.
        self._serve_until: datetime | None = None
        self._noted_wake: datetime | None = None
        self._carried: dict[str, tuple[tuple[Any, ...], tuple[Any, BaseException | None, int]]] = {}
        self._took_over_dead = False  # run_due() looks once for leases left by dead processes on this host

    async def __aenter__(self) -> Runner:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drop the cache (closing its generators). Leases are only held inside calls, so none remain."""
        while self._cache:
            _, execution = self._cache.popitem()
            await execution.close()

    # -- public API ----------------------------------------------------------

    async def start(self, dialog_fn: Dialog | str, conversation_id: str, *args: Any, **kwargs: Any) -> Status:
        """Begin a conversation running ``dialog_fn(*args, **kwargs)``; return its status once it blocks.

        Starting an id whose latest run has not ended raises
        ``ConversationExistsError``; an ended one starts a new run on the same
        log (sequence numbers continue).
        """
        return await self._start(dialog_fn, conversation_id, list(args), kwargs, tz=None)

    async def _start(
        self,
        dialog_fn: Dialog | str,
        conversation_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        tz: str | None,
        schedule: tuple[str, datetime] | None = None,
    ) -> Status:
        schedule_id, occurrence = schedule if schedule is not None else (None, None)
        # By name, even when given the object: a replay looks the name up, so the warm run must run that code too.
        chosen = lookup(dialog_fn.name if isinstance(dialog_fn, Dialog) else dialog_fn)
        json_args = to_json(args, f"the arguments of {chosen.name}")
        json_kwargs = to_json(kwargs, f"the keyword arguments of {chosen.name}")
        try:  # checked before anything is stored: a misfit would otherwise leave a run that can never start
            inspect.signature(chosen.fn).bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"dialog {chosen.name!r} cannot take these arguments: {exc}") from None
        conversation_tz = tz or self.tz
        zone(conversation_tz)
        async with self._lock(conversation_id):
            now = self.clock.now()
            row = await self.store.get(conversation_id)
            if row is None:
                started = Started(
                    seq=1, at=now, dialog=chosen.name, version=chosen.version,
                    args=json_args, kwargs=json_kwargs, tz=conversation_tz, run=1,
                    schedule_id=schedule_id, occurrence=occurrence,
                )  # fmt: skip
                fresh = ConversationRow(
                    id=conversation_id, dialog=chosen.name, last_seq=1, run=1, run_seq=1, updated_at=now,
                    tz=conversation_tz, lease_owner=self.owner, lease_until=now + self.lease,
                )  # fmt: skip
                try:
                    await self.store.create(fresh, [started])
                except ConflictError:
                    raise ConversationExistsError(conversation_id, "running") from None
                execution = Execution.begin(conversation_id, chosen, started)
            else:
                if row.state not in _ENDED:
                    raise ConversationExistsError(conversation_id, row.state)
                leased = await self._acquire(conversation_id, row, now)
                if leased is None:
                    raise ConversationExistsError(conversation_id, "being advanced by another runner")
                await self._forget(conversation_id)
                history = await self.store.load(conversation_id)
                started = Started(
                    seq=history[-1].seq + 1 if history else 1, at=now, dialog=chosen.name, version=chosen.version,
                    args=json_args, kwargs=json_kwargs, tz=conversation_tz, run=leased.run + 1,
                    schedule_id=schedule_id, occurrence=occurrence,
                )  # fmt: skip
                update = RowUpdate(
                    dialog=chosen.name, state="running", run=started.run, run_seq=started.seq,
                    parked=False, needs_advance=False, tz=conversation_tz,
                    clear=frozenset({"result", "error", "wake_at"}),
                )  # fmt: skip
                try:
                    await self.store.append(conversation_id, [started], update, now)
                except ConflictError:
                    await self.store.release(conversation_id, self.owner, None)
                    raise ConversationExistsError(conversation_id, "being advanced by another runner") from None
                execution = Execution.begin(conversation_id, chosen, started, history)
            retry_row: ConversationRow | None = None
            for _ in range(_MAX_ATTEMPTS):
                try:
                    return await self._advance_and_release(conversation_id, execution, retry_row)
                except ConflictError:
                    # The run has started, but another runner made a reply durable while this one advanced it
                    # (during a call, say): take the conversation back and go on, or leave it to its new holder.
                    now = self.clock.now()
                    row = await self.store.get(conversation_id)
                    retry_row = None if row is None else await self._acquire(conversation_id, row, now)
                    if retry_row is None:
                        return await self.status(conversation_id)
                    try:
                        execution = await self._execution(retry_row)
                    except BaseException:
                        await self.store.release(conversation_id, self.owner, None)
                        raise
            return await self.status(conversation_id)

    async def deliver(self, conversation_id: str, text: str, *, metadata: dict[str, Any] | None = None) -> Status:
        """Hand the conversation an inbound message.

        When this returns the message is durable. If this runner could claim
        the conversation, it has also been advanced as far as it can go and
        its messages handed to the channel; if another runner holds it, that
        runner advances it.
        """
        if not isinstance(text, str):
            raise NotTextError(text)
        if len(text) > self.max_message_chars:
            raise MessageTooLargeError(len(text), self.max_message_chars)
        json_metadata = {} if not metadata else to_json(metadata, "message metadata")
        if not isinstance(json_metadata, dict):
            raise InvalidInputError(f"deliver(metadata=...) takes a dict, not {type(metadata).__name__}")
        async with self._lock(conversation_id):
            recorded: ReplyReceived | None = None  # our reply, once it is known to be in the log
            for attempt in range(_MAX_ATTEMPTS):
                now = self.clock.now()
                cached = self._cache.get(conversation_id) if attempt == 0 else None
                if cached is not None and not cached.ended:
                    # Warm: advance first (it is pure) and let the first append take the lease, if nothing
                    # moved since this runner last wrote (see Claim): one commit a turn fewer. If something
                    # did, the append writes nothing, and the claim-first path below takes over.
                    del self._cache[conversation_id]
                    claim = self._claim(cached, now)
                    reply = cached.input_reply(text, json_metadata, now)
                    try:
                        return await self._advance_and_release(conversation_id, cached, claim=claim)
                    except ConflictError:
                        recorded = await self._in_log(conversation_id, reply)
                        continue
                # The lease is usually free: claim it at once and read the row only when that fails.
                leased = await self.store.acquire(conversation_id, self.owner, now + self.lease, now)
                if leased is None:
                    row = await self.store.get(conversation_id)
                    if row is None:
                        raise UnknownConversationError(conversation_id)
                    if row.state in _ENDED and not row.parked:
                        if recorded is not None:  # consumed meanwhile, and the run ended
                            return await self.status(conversation_id)
                        raise ConversationEndedError(conversation_id, row.state)
                    leased = await self._acquire(conversation_id, row, now)
                if leased is None:
                    if recorded is not None:  # already in the log: flag it for the runner holding the lease
                        await self.store.append(conversation_id, [], RowUpdate(needs_advance=True), self.clock.now())
                        self._wake_serve()
                        return await self.status(conversation_id)
                    if await self._append_unleased(conversation_id, text, json_metadata):
                        return await self.status(conversation_id)
                    continue
                if recorded is not None and leased.state in _ENDED:  # consumed meanwhile, and the run ended
                    await self.store.release(conversation_id, self.owner, None)
                    return await self.status(conversation_id)
                if leased.state in _ENDED and not leased.parked:
                    await self.store.release(conversation_id, self.owner, None)
                    raise ConversationEndedError(conversation_id, leased.state)
                # A log loaded here leaves the collector paused until the advance has replayed it and dropped
                # what it read (see CollectorHold): its events are freed without the collector walking them.
                hold = CollectorHold()
                try:
                    with hold.loading():
                        execution = await self._execution(leased)
                except BaseException:
                    hold.resume()
                    await self._abandon(conversation_id)
                    raise
                if execution.ended and not leased.parked:
                    hold.resume()
                    await self._release(conversation_id, execution)
                    if recorded is not None:
                        return await self.status(conversation_id)
                    raise ConversationEndedError(conversation_id, execution.state)
                if recorded is None:
                    reply = execution.input_reply(text, json_metadata, now)
                try:
                    return await self._advance_and_release(conversation_id, execution, leased, hold=hold)
                except ConflictError:
                    # The advance may have appended our reply before it lost the race (it flushes before a
                    # call): then the retry must advance the log as it is, never record the reply again.
                    if recorded is None:
                        recorded = await self._in_log(conversation_id, reply)
                    continue
            raise DynapromptError(f"conversation {conversation_id!r}: gave up after {_MAX_ATTEMPTS} conflicting writes")

    async def run_due(self) -> int:
        """Fire every timer and scheduled send that is due now (and pick up stranded work); return how many
        conversations were advanced.

        Due conversations are advanced concurrently, up to ``due_concurrency`` at a time, taken soonest first
        (each under its own lease, as always), so their store writes share transactions where the store
        batches them. A conversation that fails is logged and leaves the others to go on; cancelling
        ``run_due`` cancels them all, and each releases its lease.
        """
        now = self.clock.now()
        await scheduling.fire_due(self, now)
        failure: Exception | None = None
        pool: _FirePool | None = None
        try:
            async with anyio.create_task_group() as group:
                pool = _FirePool(group, self.due_concurrency, self._fire_alone, self._logs_of)
                try:
                    await self._queue_due(pool, now)
                except Exception as exc:  # the store failed us: what was handed out still finishes, then raised
                    failure = exc
        finally:
            if pool is not None:
                await self._release_unfired(pool.unfired())
        if failure is not None:
            raise failure
        assert pool is not None
        return pool.fired

    async def _queue_due(self, pool: _FirePool, now: datetime) -> None:
        """Hand ``pool`` everything due at ``now``, a batch at a time, soonest first."""
        if not self._took_over_dead:
            # A process killed mid-advance leaves its lease until it expires, and due() skips leased rows; a
            # restart on the same host takes those over at once (the owner is provably dead), so its
            # half-done advances and unhanded messages do not wait out the lease.
            self._took_over_dead = True
            rows = await self.store.leased()  # not every row: a store of a million conversations has few leases
            pool.add([row.id for row in rows if row.lease_owner and _owner_is_dead(row.lease_owner)], "taken over")
        # Each read is padded by the rows this pass has seen that the last read still found due (in flight and
        # not yet claimed, failed, refused by the channel; usually the soonest, so read first). Padded by
        # everything seen, a pass over a backlog of n read O(n) rows each time, O(n^2 / due_batch) in all, and
        # fell further behind the more behind it was. Whatever the order, a read shorter than its limit holds
        # everything due, so the pass misses nothing.
        still_due = 0
        while True:
            await pool.taken()  # the next batch once the workers have taken this one
            limit = self.due_batch + still_due
            found = await self.store.due(now, limit)
            # Claimed before any log is read: runners sharing the store split what is due instead of each
            # replaying all of it for all but one to lose the claim. One write for the batch; what another
            # runner took meanwhile is skipped (it is being advanced).
            fresh = [conversation_id for conversation_id in found if conversation_id not in pool.seen]
            taken = await self.store.acquire_many(fresh, self.owner, now + self.lease, now) if fresh else []
            added = pool.add(found, "advanced", claimed=taken)
            if len(found) < limit:
                return  # that was everything due at ``now``
            # None new: every row read was seen, so read past them all next time (the limit grows each time
            # round, so this ends).
            still_due = len(found) - added if added else len(found)

    async def _release_unfired(self, conversation_ids: list[str]) -> None:
        """Drop the leases ``run_due`` claimed for conversations it did not get to (it was cancelled or failed),
        even while being cancelled. One this runner is advancing meanwhile (a ``deliver``) keeps its lease: that
        advance releases it."""
        with anyio.CancelScope(shield=True):
            for conversation_id in conversation_ids:
                if conversation_id not in self._locks:
                    await self._drop_lease(conversation_id)

    async def _fire_alone(
        self, conversation_id: str, action: str, events: list[Event] | None, claimed: bool = False
    ) -> None:
        """``_fire`` one conversation of a ``run_due`` pass (``claimed``: its lease taken already); its failure is
        its own (logged)."""
        try:
            await self._fire(conversation_id, events, claimed=claimed)
        except NondeterminismError as exc:
            log.error("parked: %s", exc)
        except Exception:
            log.exception("conversation %r could not be %s", conversation_id, action)

    async def serve(self) -> None:
        """Fire timers as they fall due, until cancelled.

        Sleeps until the earliest wake-up in the store, waking early when
        this runner records an earlier one, and at least every
        ``poll_interval`` seconds to pick up what other runners left. Work
        that stays due after a pass (a channel refused a message, another
        runner holds the conversation) is retried at the next poll; it does
        not hold back the wake-ups after it.
        """
        try:
            await self._serve()
        finally:
            self._serve_until = None

    async def _serve(self) -> None:
        failures = 0
        spacing = timedelta(seconds=self.pass_interval)
        while True:
            self._wake_requested = False
            pass_at = self.clock.now()
            # During the pass, wake-ups recorded here are not signalled: the query after the pass sees them
            # (and _noted_wake covers those recorded while it runs).
            self._serve_until, self._noted_wake = pass_at, None
            try:
                await self.run_due()
                # Past what this pass saw due: what stayed due waits for the poll, and the sleep is until the
                # next wake-up after it, not until the poll.
                next_at = await self.store.next_wake_at(after=pass_at)
            except StoreError as exc:
                # The database is away: keep trying, backing off, rather than stopping the service.
                failures += 1
                delay = min(self.poll_interval * 2**failures, 30.0)
                log.warning("store unavailable (%s); retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)
                continue
            failures = 0
            noted = self._noted_wake
            if noted is not None and (next_at is None or noted < next_at):
                next_at = noted
            if next_at is not None and next_at < pass_at + spacing:
                # Not sooner than pass_interval after this pass began: what falls due meanwhile shares a pass.
                next_at = pass_at + spacing
            self._serve_until = next_at  # None (nothing planned): any wake-up recorded from now on wakes serve
            if self._wake_requested or (next_at is not None and next_at <= self.clock.now()):
                await anyio.lowlevel.checkpoint()  # asked for, or fell due during the pass: the next pass, at once
                continue
            # One sleep that _wake_serve cancels, not a task group of waiters: a pass a wake-up, thousands a
            # second, paid about 0.3 ms of CPU for starting and ending that group and its two tasks.
            with anyio.move_on_after(self.poll_interval), anyio.CancelScope() as sleep:
                self._serve_sleep = sleep
                try:
                    if next_at is None:
                        await anyio.sleep_forever()
                    else:
                        await self.clock.sleep_until(next_at)
                finally:
                    self._serve_sleep = None

    async def retry(self, conversation_id: str) -> Status:
        """Replay a parked conversation against the current code (after a fix); its status after."""
        async with self._lock(conversation_id):
            await self._forget(conversation_id)
            row = await self.store.get(conversation_id)
            if row is None:
                raise UnknownConversationError(conversation_id)
            if row.parked:
                await self.store.append(conversation_id, [], RowUpdate(needs_advance=True), self.clock.now())
        await self._fire(conversation_id)
        return await self.status(conversation_id)

    async def schedule(
        self,
        dialog_fn: Dialog | str,
        conversation_id: str,
        *args: Any,
        at: datetime | str | None = None,
        every: str | None = None,
        tz: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Schedule a conversation once (``at``) or again and again (``every``); return the schedule id.

        ``at`` is an aware datetime or a phrase ("tomorrow at 9am", "in 20
        minutes") and must lie in the future; ``every`` is a cron expression or
        a phrase ("every weekday at 10:30", "every 2 hours"; the list is in
        :mod:`dynaprompt.recurrence`). With both, ``at`` is the first fire and
        ``every`` the rhythm after it. ``tz`` (default: the runner's) is the
        zone of both and becomes the conversation's zone. Each fire starts a
        new run of ``dialog_fn(*args, **kwargs)`` in ``conversation_id``; the
        runner's ``schedule_overlap``, ``schedule_missed`` and
        ``schedule_grace`` options say what happens when the previous run is
        still live or a fire was missed.
        """
        return await scheduling.create(self, dialog_fn, conversation_id, args, kwargs, at=at, every=every, tz=tz)

    async def schedules(self) -> list[Schedule]:
        """Every schedule with its next fire time, soonest first."""
        return await scheduling.listing(self)

    async def unschedule(self, schedule_id: str) -> bool:
        """Remove a schedule; False if there was none. A run it already started goes on."""
        return await self.store.delete_schedule(schedule_id)

    async def _end_run(self, conversation_id: str, reason: str) -> None:
        """End the live run of a conversation as failed with ``reason`` (schedule overlap "replace")."""
        async with self._lock(conversation_id):
            now = self.clock.now()
            row = await self.store.get(conversation_id)
            if row is None or row.state in _ENDED:
                return
            leased = await self._acquire(conversation_id, row, now)
            if leased is None:
                raise ConversationExistsError(conversation_id, "being advanced by another runner")
            await self._forget(conversation_id)
            events = await self.store.load(conversation_id, leased.last_seq)
            last_seq = events[-1].seq if events else leased.last_seq
            error = ErrorInfo(type="Replaced", message=reason)
            update = RowUpdate(state="failed", error=str(error), clear=frozenset({"wake_at"}))
            await self.store.append(conversation_id, [Failed(seq=last_seq + 1, at=now, error=error)], update, now)
            await self.store.release(conversation_id, self.owner, None)

    async def status(self, conversation_id: str) -> Status:
        """Where the conversation's latest run stands."""
        row = await self.store.get(conversation_id)
        if row is None:
            raise UnknownConversationError(conversation_id)
        return _status(row)

    async def transcript(self, conversation_id: str) -> list[TranscriptEntry]:
        """Every message of every run, both directions, in log order.

        A scheduled send appears when it was delivered (at that instant, with
        ``due_at`` in its metadata); a cancelled one never does.
        """
        events = await self.store.load(conversation_id)
        if not events and await self.store.get(conversation_id) is None:
            raise UnknownConversationError(conversation_id)
        scheduled: dict[str, Sent] = {}
        entries: list[TranscriptEntry] = []
        for event in events:
            if isinstance(event, Sent):
                mid = message_id(conversation_id, event.seq)
                if event.due_at is None:
                    entries.append(
                        TranscriptEntry(id=mid, direction="out", text=event.text, at=event.at, metadata=event.metadata)
                    )
                else:
                    scheduled[mid] = event
            elif isinstance(event, Delivered) and event.message_id in scheduled:
                sent = scheduled.pop(event.message_id)
                metadata = {**sent.metadata, "due_at": _iso(sent.due_at)}
                entries.append(
                    TranscriptEntry(
                        id=event.message_id, direction="out", text=sent.text, at=event.at, metadata=metadata
                    )
                )
            elif isinstance(event, ReplyReceived):
                mid = message_id(conversation_id, event.seq)
                entries.append(
                    TranscriptEntry(id=mid, direction="in", text=event.text, at=event.at, metadata=event.metadata)
                )
        return entries

    # -- internals -------------------------------------------------------------

    def _lock(self, conversation_id: str) -> _ConversationLock:
        """Serialise this runner's own work on one conversation; no state outlives the work."""
        return _ConversationLock(self._locks, conversation_id)

    async def _acquire(self, conversation_id: str, row: ConversationRow, now: datetime) -> ConversationRow | None:
        steal = row.lease_owner if row.lease_owner and _owner_is_dead(row.lease_owner) else None
        return await self.store.acquire(conversation_id, self.owner, now + self.lease, now, steal_from=steal)

    async def _append_unleased(self, conversation_id: str, text: str, metadata: dict[str, Any]) -> bool:
        """Make a reply durable while another runner holds the conversation; it will advance it."""
        row = await self.store.get(conversation_id)
        if row is None:
            raise UnknownConversationError(conversation_id)
        if row.lease_owner is None:
            return False  # freed meanwhile: claim it instead
        events = await self.store.load(conversation_id, row.last_seq)
        last_seq = events[-1].seq if events else row.last_seq
        reply = ReplyReceived(seq=last_seq + 1, at=self.clock.now(), text=text, metadata=metadata)
        try:
            await self.store.append(conversation_id, [reply], RowUpdate(needs_advance=True), self.clock.now())
        except ConflictError:
            await anyio.sleep(0.001)
            return False
        self._wake_serve()
        return True

    async def _logs_of(self, conversation_ids: list[str]) -> dict[str, list[Event]]:
        """For ``run_due``: the logs of those of these conversations not warm in the cache, read in one go; ``{}``
        if that read fails (each then reads its own log, so an unreadable one fails its own conversation only)."""
        cold = [conversation_id for conversation_id in conversation_ids if conversation_id not in self._cache]
        if not cold:
            return {}
        try:
            return await self.store.load_logs(cold)
        except Exception:
            log.debug("could not read %d logs together; each is read alone", len(cold), exc_info=True)
            return {}

    async def _fire(self, conversation_id: str, events: list[Event] | None = None, *, claimed: bool = False) -> None:
        """Advance a due conversation as far as it goes; ``events``: its whole log, if already read; ``claimed``:
        its lease was taken for this (``run_due``), and is dropped if this fails before an advance takes over."""
        async with self._lock(conversation_id):
            try:
                await self._fire_locked(conversation_id, events)
            except BaseException:
                if claimed:
                    await self._abandon(conversation_id)
                raise

    async def _fire_locked(self, conversation_id: str, events: list[Event] | None) -> None:
        """``_fire``'s work, holding the conversation's lock."""
        now = self.clock.now()
        cached = self._cache.pop(conversation_id, None)
        if cached is not None:
            # Warm, as in deliver(): advance first, and let the first append take the lease if nothing moved.
            try:
                await self._advance_released(conversation_id, cached, claim=self._claim(cached, now))
                return
            except ConflictError:
                now = self.clock.now()  # it moved (and nothing was written): claim first, replay, go on
        else:
            # Cold: replay the log (read after run_due claimed the lease with its batch, or read without it),
            # and let the first append take the lease, or keep ours, if the row still ends where that log does
            # (see Claim): no claim of its own, one write a wake-up fewer.
            # Parked, flagged or held by a live runner, or moved meanwhile: nothing is written, and the
            # claim-first path below takes over.
            execution = await self._replayed(conversation_id) if events is None else _rebuilt(conversation_id, events)
            if execution is not None:
                try:
                    await self._advance_released(conversation_id, execution, claim=self._claim(execution, now))
                    return
                except ConflictError:
                    now = self.clock.now()
        try:
            # Due work usually has a free lease: claim it at once, read the row only when that fails (a dead
            # holder's lease may then be taken over). One statement per wake-up instead of two.
            leased = await self.store.acquire(conversation_id, self.owner, now + self.lease, now)
            if leased is None:
                row = await self.store.get(conversation_id)
                if row is None:
                    return
                leased = await self._acquire(conversation_id, row, now)
        except anyio.get_cancelled_exc_class():
            # The claim may have committed as we were cancelled (a store that batches writes commits a
            # claim whose caller stopped waiting): drop it, or it would hold the conversation until it expires.
            await self._abandon(conversation_id)
            raise
        if leased is None:
            return
        try:
            await self._advance_leased(conversation_id, leased)
        except BaseException:  # failed or cancelled: whatever it was, the lease goes now (a no-op if it went)
            await self._abandon(conversation_id)
            raise

    async def _advance_leased(self, conversation_id: str, leased: ConversationRow) -> None:
        """``_fire``'s work once it holds the lease: advance the conversation and release it."""
        execution = await self._execution(leased)
        if leased.parked and not leased.needs_advance:
            await self._release(conversation_id, execution)
            return
        for _ in range(_MAX_ATTEMPTS):
            try:
                await self._advance_released(conversation_id, execution, leased)
                return
            except ConflictError:
                # A reply was made durable meanwhile and the failed advance dropped our lease: claim it
                # again and go on, so that reply is consumed now, not on some later pass.
                current = await self.store.get(conversation_id)
                now = self.clock.now()
                retaken = None if current is None else await self._acquire(conversation_id, current, now)
                if retaken is None:
                    return
                leased = retaken
                execution = await self._execution(leased)

    async def _in_log(self, conversation_id: str, reply: ReplyReceived) -> ReplyReceived | None:
        """``reply`` if the log holds it at its seq (an advance that lost a race may have appended it), else
        None."""
        stored = await self.store.load(conversation_id, reply.seq - 1)
        return reply if stored and stored[0] == reply else None

    def _claim(self, cached: Execution, now: datetime) -> Claim:
        """The lease claim for advancing ``cached`` without holding it: granted only if the conversation is
        where this runner last left it (see ``Claim``)."""
        return build(
            Claim, owner=self.owner, until=now + self.lease, now=now, last_seq=cached.last_seq,
            run_seq=cached.started.seq,
        )  # fmt: skip

    async def _execution(self, row: ConversationRow) -> Execution:
        """The conversation's execution, from the cache if it is current, else replayed from the log."""
        cached = self._cache.pop(row.id, None)
        if cached is not None:
            if cached.started.seq == row.run_seq and cached.last_seq <= row.last_seq:
                if cached.last_seq < row.last_seq:
                    cached.extend(await self.store.load(row.id, cached.last_seq))
                return cached
            await cached.close()
        execution = _rebuilt(row.id, await self.store.load(row.id), row.run_seq)
        if execution is None:
            raise UnknownConversationError(row.id)
        return execution

    async def _replayed(self, conversation_id: str) -> Execution | None:
        """The latest run of the conversation replayed from its whole log, read without a lease (a claim made
        from it checks that the row still ends where this log does); None if it has no log."""
        return _rebuilt(conversation_id, await self.store.load(conversation_id))

    async def _advance_and_release(
        self,
        conversation_id: str,
        execution: Execution,
        row: ConversationRow | None = None,
        *,
        claim: Claim | None = None,
        hold: CollectorHold | None = None,
    ) -> Status:
        """Advance, append, hand off, and release the lease (see ``_advance_released``); the status after."""
        written = await self._advance_released(conversation_id, execution, row, claim=claim, hold=hold)
        return _status(written) if written is not None else await self.status(conversation_id)

    async def _advance_released(
        self,
        conversation_id: str,
        execution: Execution,
        row: ConversationRow | None = None,
        *,
        claim: Claim | None = None,
        hold: CollectorHold | None = None,
    ) -> ConversationRow | None:
        """Advance, append, hand off, and release the lease; go again if input arrived meanwhile. With
        ``claim``, the lease is not held yet: the advance's first append takes it; ``hold`` is resumed once the
        first advance has run. The row the release was written with, if it went with the last append, else None.
        (A timer's advance wants no status: building one, or reading the row for it, was a wake-up's work for
        nothing.)"""
        stale = row is not None and (row.parked or row.needs_advance or row.state != execution.state)
        try:
            while True:
                written = await self._advance(conversation_id, execution, stale, claim, hold)
                claim, hold = None, None
                if written is not None and written.lease_owner is None:
                    break  # the advance's last append dropped the lease with it
                written = None
                if await self._release(conversation_id, execution):
                    break
                current = await self.store.get(conversation_id)
                if current is None or current.lease_owner != self.owner:
                    await self._forget(conversation_id, execution)
                    break
                stale = True
                execution.extend(await self.store.load(conversation_id, execution.last_seq))
        except BaseException:
            if hold is not None:
                hold.resume()
            await self._abandon(conversation_id, execution)
            raise
        self._keep(conversation_id, execution)
        return written

    async def _abandon(self, conversation_id: str, execution: Execution | None = None) -> None:
        """Drop our cached state and our lease after a failure, even while being cancelled:
        a runner that stops must not leave others waiting for its lease to expire."""
        with anyio.CancelScope(shield=True):
            await self._forget(conversation_id, execution)
            await self._drop_lease(conversation_id)

    async def _drop_lease(self, conversation_id: str) -> None:
        """Release our lease on the conversation wherever its log ends; a failure is logged (it then expires)."""
        try:
            await self.store.release(conversation_id, self.owner, None)
        except Exception:
            log.warning("could not release the lease on %r", conversation_id, exc_info=True)

    async def _renew_lease_while(self, conversation_id: str) -> None:
        """Keep our lease alive while a long call runs (until cancelled)."""
        interval = max(self.lease.total_seconds() / 3, 0.05)
        while True:
            await anyio.sleep(interval)
            now = self.clock.now()
            await self.store.acquire(conversation_id, self.owner, now + self.lease, now)

    async def _release(self, conversation_id: str, execution: Execution) -> bool:
        return await self.store.release(conversation_id, self.owner, execution.last_seq)

    async def _advance(
        self,
        conversation_id: str,
        execution: Execution,
        row_stale: bool,
        claim: Claim | None = None,
        hold: CollectorHold | None = None,
    ) -> ConversationRow | None:
        """Drive the execution until it blocks, appending and handing off as it goes; the row of the last append
        if that append also released our lease, else None (the caller releases). ``claim`` goes with the first
        append (which then always writes, events or not); ``hold`` is resumed as soon as the first advance, which
        drops the log it read, has returned (before any write)."""
        now = self.clock.now()
        while True:
            try:
                try:
                    outcome = await execution.advance(now)
                finally:
                    if hold is not None:
                        hold.resume()
                        hold = None
            except NondeterminismError as exc:
                inputs = [e for e in execution.take_new_events() if e.kind in INPUT_KINDS]
                update = RowUpdate(
                    state="failed", parked=True, error=f"NondeterminismError: {exc}", needs_advance=False,
                    clear=frozenset({"wake_at"}), claim=claim,
                )  # fmt: skip
                await self.store.append(conversation_id, inputs, update, now)
                await self._forget(conversation_id, execution)
                raise
            if outcome.call is None:
                if execution.deliver_first is None:
                    break
                # Caught up late: sends fell due before a timer that is due too. They go first, then the timer.
                await self._flush(conversation_id, execution, now, outcome.events, force=row_stale, claim=claim)
                claim, row_stale = None, False
                if await self._hand_off(conversation_id, execution, now, due_by=execution.deliver_first) is None:
                    return None  # the channel refused one: the timer waits for the next pass (the caller releases)
                continue
            await self._flush(conversation_id, execution, now, outcome.events, claim=claim)
            claim = None
            await self._hand_off(conversation_id, execution, now)
            await self.store.acquire(conversation_id, self.owner, self.clock.now() + self.lease, now)
            async with anyio.create_task_group() as renewing:
                renewing.start_soon(self._renew_lease_while, conversation_id)
                result, error, attempts = await self._run_call(conversation_id, execution, outcome.call)
                renewing.cancel_scope.cancel()
            now = self.clock.now()
            execution.record_call(result, error, now, attempts)
        # The last append of the advance carries the lease release (one commit, not two): it is the hand-off's
        # "delivered" append when messages are due, else this one. A stale row is rewritten even with no events.
        if not execution.due_messages(now):
            return await self._flush(
                conversation_id, execution, now, outcome.events, force=row_stale, release=True, claim=claim
            )
        await self._flush(
            conversation_id, execution, now, outcome.events, force=row_stale, claim=claim, provisional=True
        )
        return await self._hand_off(conversation_id, execution, now, release=True)

    async def _flush(
        self,
        conversation_id: str,
        execution: Execution,
        now: datetime,
        events: list[Event],
        *,
        force: bool = False,
        release: bool = False,
        claim: Claim | None = None,
        provisional: bool = False,
    ) -> ConversationRow | None:
        """Append ``events`` with the row they imply (taking the lease with them if ``claim``, dropping it if
        ``release``); the new row, or None if there was nothing to write. ``provisional``: the hand-off's
        append follows at once (see ``RowUpdate.provisional``)."""
        if not events and not force and claim is None:
            return None
        wake_at = execution.wake_at()
        fields = dict(
            state=execution.state, wake_at=wake_at, needs_advance=False, parked=False,
            result=execution.result, error=str(execution.error) if execution.error else None,
            clear=_FLUSH_CLEARS,
            # Only an append of events (or a claim, which checks last_seq) may drop the lease: either proves the
            # log did not move. A bare row rewrite must not, or a reply another runner appended just before
            # would be left unadvanced.
            release_owner=self.owner if release and (events or claim) else None, claim=claim,
            provisional=provisional,
        )  # fmt: skip
        # Typed values of our own: validated only when the result is a container (the update gets its own copy).
        result = execution.result
        update = (
            build(RowUpdate, **fields)
            if result is None or isinstance(result, str | int | float)
            else RowUpdate(**fields)
        )
        try:
            written = await self.store.append(conversation_id, events, update, now)
        except ConflictError:
            await self._forget(conversation_id, execution)
            raise
        self._carried.pop(conversation_id, None)
        if wake_at is not None and wake_at > now:
            self._note_wake(wake_at)
        return written

    def _note_wake(self, wake_at: datetime) -> None:
        """Wake serve() early only for a wake-up it would sleep past: one before what it plans to sleep until.
        (One due now is a message the advance hands over next, or one a channel refused, which serve retries
        at its next poll; one after serve's plan is found by its next pass. Waking for either cost an empty
        pass of the serve loop per advance.)"""
        if self._noted_wake is None or wake_at < self._noted_wake:
            self._noted_wake = wake_at
        if self._serve_until is None or wake_at < self._serve_until:
            self._wake_serve()

    def _wake_serve(self) -> None:
        """Have serve() start its next pass now: at once if it sleeps, else as soon as its pass is over."""
        self._wake_requested = True
        if self._serve_sleep is not None:
            self._serve_sleep.cancel()

    async def _hand_off(
        self,
        conversation_id: str,
        execution: Execution,
        now: datetime,
        *,
        release: bool = False,
        due_by: datetime | None = None,
    ) -> ConversationRow | None:
        """Hand the messages due by ``due_by`` (default ``now``) to the channel and record them delivered; the
        row of that append (see ``_flush``), or None if none was handed over."""
        due = execution.due_messages(due_by or now)
        if not due:
            return None
        handed: list[str] = []
        for sent in due:
            mid = f"{conversation_id}:{sent.seq}"
            if sent.metadata:
                metadata = dict(sent.metadata)
                if sent.due_at is not None:
                    metadata["due_at"] = _iso(sent.due_at)
                message = Message(
                    id=mid, conversation_id=conversation_id, text=sent.text,
                    at=sent.due_at or sent.at, to=sent.to, metadata=metadata,
                )  # fmt: skip
            else:  # the values of a recorded event, and a fresh dict: nothing to validate again
                message = build(
                    Message, id=mid, conversation_id=conversation_id, text=sent.text, at=sent.due_at or sent.at,
                    to=sent.to, metadata={} if sent.due_at is None else {"due_at": _iso(sent.due_at)},
                )  # fmt: skip
            if self.channel is not None:
                try:
                    await self.channel.deliver(message)
                except Exception:
                    log.exception("channel refused message %s; it stays queued", mid)
                    break
            handed.append(mid)
        if not handed:
            return None
        durable_seq = execution.last_seq
        delivered = execution.mark_delivered(handed, self.clock.now())
        try:
            return await self._flush(conversation_id, execution, now, delivered, release=release)
        except ConflictError:
            # Another runner made a reply durable while the channel held the messages (it may, lease or not): it
            # took the seqs of the marks. The messages were handed all the same, so the marks go after what came
            # in, or the replay that answers that reply would hand them over again; then the caller reloads.
            await self._mark_handed(conversation_id, durable_seq, handed)
            raise

    async def _mark_handed(self, conversation_id: str, after_seq: int, handed: list[str]) -> None:
        """Record messages handed to the channel as delivered at the end of the log as it now is (past
        ``after_seq``), those not marked there yet; the row is flagged for the advance that follows."""
        for _ in range(_MAX_ATTEMPTS):
            events = await self.store.load(conversation_id, after_seq)
            marked = {event.message_id for event in events if isinstance(event, Delivered)}
            pending = [mid for mid in handed if mid not in marked]
            if not pending:
                return
            last_seq, now = events[-1].seq if events else after_seq, self.clock.now()
            marks: list[Event] = [
                build(Delivered, seq=last_seq + number, at=now, message_id=mid)
                for number, mid in enumerate(pending, start=1)
            ]
            try:
                await self.store.append(conversation_id, marks, RowUpdate(needs_advance=True), now)
                return
            except ConflictError:
                continue
        log.warning("could not record %s as delivered on %r; they may be handed over again", handed, conversation_id)

    async def _run_call(
        self, conversation_id: str, execution: Execution, effect: Call
    ) -> tuple[Any, BaseException | None, int]:
        # The same call at the same place in the log: the log may have moved on since (a conflict), and
        # a result carried from elsewhere must never stand in for another call.
        # The place counts effects only: a reply another runner appended meanwhile (the usual conflict) moves
        # last_seq but not the call, and running the call again then would break "side effects run once".
        place = execution.effect_events
        key = (effect.name, execution.started.seq, place, effect.arguments, effect.keywords)
        carried = self._carried.pop(conversation_id, None)
        if carried is not None and carried[0] == key:
            return carried[1]
        delay = effect.retry_delay
        attempt = 0
        while True:
            attempt += 1
            try:
                if inspect.iscoroutinefunction(effect.fn):
                    result = await effect.fn(*effect.arguments, **effect.keywords)
                else:
                    result = await anyio.to_thread.run_sync(partial(effect.fn, *effect.arguments, **effect.keywords))
                    if inspect.isawaitable(result):
                        result = await result
                outcome: tuple[Any, BaseException | None, int] = (result, None, attempt)
                break
            except Exception as exc:
                if attempt > effect.retries:
                    outcome = (None, exc, attempt)
                    break
                await anyio.sleep(delay)
                delay *= 2
        # Kept until the result is durable: if the append conflicts, the retry reuses it.
        self._carried[conversation_id] = (key, outcome)
        return outcome

    def _keep(self, conversation_id: str, execution: Execution) -> None:
        if self.cache_size <= 0 or (execution.ended and not execution.outbox):
            self._cache.pop(conversation_id, None)
            return
        self._cache[conversation_id] = execution
        self._cache.move_to_end(conversation_id)
        while len(self._cache) > self.cache_size:
            _, evicted = self._cache.popitem(last=False)
            evicted.frames.clear()  # generators are closed by the garbage collector

    async def _forget(self, conversation_id: str, execution: Execution | None = None) -> None:
        cached = self._cache.pop(conversation_id, None)
        for dropped in {id(x): x for x in (cached, execution) if x is not None}.values():
            await dropped.close()


class _FirePool:
    """``run_due``'s workers: at most ``size`` conversations advanced at once, taken from a queue in due order.

    The workers start together, so their writes move in step and share transactions where the store batches
    them; each takes the next conversation as soon as it is done with one (a slow one holds up only itself).
    """

    __slots__ = (
        "_dropped", "_fire", "_group", "_load", "_loading", "_logs", "_queue", "_size", "_taken", "_workers", "fired",
        "seen",
    )  # fmt: skip

    def __init__(
        self,
        group: anyio.abc.TaskGroup,
        size: int,
        fire: Callable[[str, str, list[Event] | None, bool], Awaitable[None]],
        load: Callable[[list[str]], Awaitable[dict[str, list[Event]]]],
    ) -> None:
        self._group = group
        self._size = size
        # (conversation id, what to call the work in a log line, its log if read already, claimed); never raises
        self._fire = fire
        self._load = load  # the logs of these conversations, read together (those it leaves out are read alone)
        self._queue: deque[tuple[str, str, bool]] = deque()  # (id, action, its lease claimed for it)
        self._logs: dict[str, list[Event]] = {}  # read together, not yet taken by a worker
        self._loading: dict[str, anyio.Event] = {}  # being read together: set when that read is over
        self._workers = 0
        self._taken: anyio.Event | None = None
        self.seen: set[str] = set()
        self.fired = 0  # conversations taken by a worker
        self._dropped: list[str] = []  # claimed, taken by a worker, cancelled before their fire began

    def add(self, conversation_ids: list[str], action: str, *, claimed: list[str] | None = None) -> int:
        """Queue the ids not seen before, starting workers for them up to ``size``; how many were new. With
        ``claimed`` (those whose lease was taken for this pass), only those are queued; the rest are seen."""
        seen = self.seen
        wanted = None if claimed is None else set(claimed)
        new = 0
        for conversation_id in conversation_ids:
            if conversation_id not in seen:
                seen.add(conversation_id)
                new += 1
                if wanted is None or conversation_id in wanted:
                    self._queue.append((conversation_id, action, wanted is not None))
        while self._workers < min(self._size, len(self._queue)):
            self._workers += 1
            self._group.start_soon(self._work)
        return new

    def unfired(self) -> list[str]:
        """The claimed conversations no worker took (the pass was cancelled or failed)."""
        return self._dropped + [conversation_id for conversation_id, _, claimed in self._queue if claimed]

    async def taken(self) -> None:
        """Return once every queued conversation has been taken by a worker."""
        if self._queue:
            self._taken = anyio.Event()
            await self._taken.wait()

    async def _work(self) -> None:
        try:
            while self._queue:
                conversation_id, action, claimed = self._queue.popleft()
                if not self._queue and self._taken is not None:
                    self._taken.set()
                    self._taken = None
                self.fired += 1
                try:
                    events = await self._log_of(conversation_id)
                except BaseException:
                    if claimed:  # cancelled before its fire could take care of the lease
                        self._dropped.append(conversation_id)
                    raise
                await self._fire(conversation_id, action, events, claimed)
        finally:
            self._workers -= 1

    async def _log_of(self, conversation_id: str) -> list[Event] | None:
        """The conversation's log if it was read with others, else None (its fire reads it). A worker that finds
        its conversation's log unread reads it together with those of the next ``size - 1`` queued ones not read
        yet: one read for the conversations woken together instead of one each."""
        loading = self._loading.get(conversation_id)
        if loading is not None:
            await loading.wait()
        elif conversation_id not in self._logs:
            batch = [conversation_id]
            batch += [
                queued
                for queued, _, _ in islice(self._queue, self._size - 1)
                if queued not in self._logs and queued not in self._loading
            ]
            done = anyio.Event()
            for queued in batch:
                self._loading[queued] = done
            try:
                self._logs.update(await self._load(batch))
            finally:
                for queued in batch:
                    del self._loading[queued]
                done.set()
        return self._logs.pop(conversation_id, None)


class _ConversationLock:
    """A FIFO lock on one conversation of one runner: ``locks`` holds an entry (its waiters) only while the
    conversation is held, so no state outlives the work. Taking a free one is a dict insert, with no
    lock object and no trip through the event loop (a wake-up takes it at least once)."""

    __slots__ = ("_conversation_id", "_locks")

    def __init__(self, locks: dict[str, deque[anyio.Event] | None], conversation_id: str) -> None:
        self._locks = locks
        self._conversation_id = conversation_id

    async def __aenter__(self) -> None:
        locks, conversation_id = self._locks, self._conversation_id
        if conversation_id not in locks:
            locks[conversation_id] = None
            return
        waiters = locks[conversation_id]
        if waiters is None:
            waiters = locks[conversation_id] = deque()
        turn = anyio.Event()
        waiters.append(turn)
        try:
            await turn.wait()  # set by the holder that hands the lock over
        except BaseException:
            if turn.is_set():  # handed over as we were cancelled: hand it on
                self._hand_on()
            else:
                waiters.remove(turn)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._hand_on()

    def _hand_on(self) -> None:
        waiters = self._locks[self._conversation_id]
        if waiters:
            waiters.popleft().set()
        else:
            del self._locks[self._conversation_id]


def _default_cache_size() -> int:
    """1,024, or ``DYNAPROMPT_CACHE_SIZE`` (our CI runs the suite again with 0, all but the
    benchmark smoke tests: replay must give the same results as the warm cache)."""
    text = os.environ.get("DYNAPROMPT_CACHE_SIZE", "1024")
    try:
        return int(text)
    except ValueError:
        raise DynapromptError(f"DYNAPROMPT_CACHE_SIZE must be a whole number, not {text!r}") from None


def _rebuilt(conversation_id: str, events: list[Event], run_seq: int | None = None) -> Execution | None:
    """The execution of the latest run in ``events`` (a whole log), caught up to its end; None if it has no run."""
    # The latest run's start: where the row says (a log numbered from 1 holds seq n at n - 1), else looked for
    # from the end.
    start_at: int | None = None if run_seq is None else run_seq - 1
    if not (
        start_at is not None
        and 0 <= start_at < len(events)
        and events[start_at].kind == "started"
        and events[start_at].seq == run_seq
    ):
        start_at = next((i for i in range(len(events) - 1, -1, -1) if events[i].kind == "started"), None)
    if start_at is None:
        return None
    started = events[start_at]
    assert isinstance(started, Started)
    execution = Execution.begin(conversation_id, lookup(started.dialog), started, events[:start_at])
    execution.extend(events[start_at + 1 :])
    return execution


def _seconds(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


def _status(row: ConversationRow) -> Status:
    fields: dict[str, Any] = dict(
        conversation_id=row.id, dialog=row.dialog, state=row.state,
        wake_at=row.wake_at.astimezone(UTC) if row.wake_at is not None else None,
        result=row.result, error=row.error, run=row.run, last_seq=row.last_seq,
    )  # fmt: skip
    # The row's values are validated already; only a container result is validated again, so the status
    # gets its own copy.
    return (
        build(Status, **fields) if row.result is None or isinstance(row.result, str | int | float) else Status(**fields)
    )


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _owner_is_dead(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer runs (its lease can be taken now)."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
