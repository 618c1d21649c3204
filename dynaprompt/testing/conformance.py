"""``check_store``: the conformance suite every :class:`~dynaprompt.Store` must pass.

One async function exercises the whole store protocol (the event log, the
conversation rows, leases, the due index and schedules) and raises
``AssertionError`` naming the first broken promise, so a store written outside
this package can be checked the way ours are::

    from dynaprompt.testing import check_store

    async def test_my_store_conforms(tmp_path):
        async def make_store():
            return MyStore(tmp_path / f"{uuid.uuid4().hex}.db")

        await check_store(make_store)

``make_store`` is called once per group of checks and must return a new,
empty store each time; ``check_store`` closes every store it was given. The
checks use fixed instants, never the clock, so they are deterministic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
from pydantic import BaseModel

from dynaprompt.errors import ConflictError
from dynaprompt.events import (
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
)
from dynaprompt.models import State
from dynaprompt.stores.base import Claim, ConversationRow, RowUpdate, ScheduleRow, Store

__all__ = ["StoreFactory", "check_store"]

StoreFactory = Callable[[], Awaitable[Store]]

# Instants with microseconds and, in places, a zone other than UTC: a store must
# give back the same instant (it may change the offset it is written in).
T0 = datetime(2026, 1, 5, 9, 0, 0, 123456, tzinfo=UTC)
PARIS = ZoneInfo("Europe/Paris")
JSON_SAMPLE: Any = {"nested": {"list": [1, 2.5, None, True, 'ü "quoted"\nline']}, "empty": {}, "n": -7}


def at(seconds: float) -> datetime:
    """``T0`` moved by ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def every_event_kind(start_seq: int = 1) -> list[Event]:
    """One event of each kind in the log, with awkward values, numbered from ``start_seq``."""
    events: list[Any] = [
        Started(
            seq=0,
            at=T0,
            dialog="m:bot",
            version="2",
            args=[1, "two", JSON_SAMPLE],
            kwargs={"k": [None]},
            tz="Asia/Kolkata",
            run=3,
        ),
        Sent(seq=0, at=at(1), text="héllo 'x' \"y\"\n🐉", to="ann", metadata=JSON_SAMPLE),
        Sent(seq=0, at=at(2), text="later", due_at=datetime(2026, 1, 6, 9, 30, tzinfo=PARIS)),
        Cancelled(seq=0, at=at(3), message_id="c:3", ok=True),
        Waiting(seq=0, at=at(4), timeout_at=at(7200)),
        Waiting(seq=0, at=at(4.5)),
        Sleeping(seq=0, at=at(5), effect="sleep_until", until=at(86400)),
        NowRead(seq=0, at=at(6), value=at(6).astimezone(PARIS)),
        Called(seq=0, at=at(7), name="m:fetch", result=JSON_SAMPLE, attempts=2),
        Called(seq=0, at=at(8), name="m:fetch", error=ErrorInfo(type="ValueError", message="no ✓"), attempts=3),
        SubStarted(seq=0, at=at(9), dialog="m:yes_no", args=["Sure?"], kwargs={"default": False}),
        TzSet(seq=0, at=at(10), zone="America/New_York"),
        EffectFailed(seq=0, at=at(11), effect="sleep_until", error=ErrorInfo(type="TimeParseError", message="?")),
        SubEnded(seq=0, at=at(12), dialog="m:yes_no", result=[True, {"a": 1.5}]),
        SubEnded(seq=0, at=at(12.5), dialog="m:yes_no", error=ErrorInfo(type="KeyError", message="'x'")),
        ReplyReceived(seq=0, at=at(13), text="", metadata={"from": "ann", "n": 1}),
        TimerFired(seq=0, at=at(14), for_seq=5),
        Delivered(seq=0, at=at(15), message_id="c:2"),
        Completed(seq=0, at=at(16), result=JSON_SAMPLE),
        Failed(seq=0, at=at(17), error=ErrorInfo(type="RuntimeError", message="boom")),
    ]
    return [event.model_copy(update={"seq": start_seq + i}) for i, event in enumerate(events)]


def _row(conversation_id: str, **fields: Any) -> ConversationRow:
    values: dict[str, Any] = {"dialog": "m:bot", "updated_at": T0, "last_seq": 1}
    values.update(fields)
    return ConversationRow(id=conversation_id, **values)


def _started(seq: int = 1, seconds: float = 0) -> Started:
    return Started(seq=seq, at=at(seconds), dialog="m:bot")


def _sent(seq: int, text: str = "hi") -> Sent:
    return Sent(seq=seq, at=at(seq), text=text)


class _Checker:
    """Assertions that say which store and which promise failed."""

    def __init__(self, store: Store, group: str) -> None:
        self.store = store
        self.group = group

    def fail(self, what: str) -> AssertionError:
        return AssertionError(f"store {self.store.url!r} fails check_store ({self.group}): {what}")

    def true(self, condition: bool, what: str) -> None:
        if not condition:
            raise self.fail(what)

    def equal(self, got: object, expected: object, what: str) -> None:
        if got != expected:
            raise self.fail(f"{what}: expected {expected!r}, got {got!r}")

    def row(self, got: ConversationRow | ScheduleRow | None, expected: dict[str, Any], what: str) -> None:
        """``got`` exists and has each field of ``expected`` (instants compared as instants)."""
        if got is None:
            raise self.fail(f"{what}: expected a row, got None")
        wrong = {name: (getattr(got, name), value) for name, value in expected.items() if getattr(got, name) != value}
        if wrong:
            details = "; ".join(f"{name} is {g!r}, expected {e!r}" for name, (g, e) in wrong.items())
            raise self.fail(f"{what}: {details}")

    def events(self, got: Sequence[Event], expected: Sequence[Event], what: str) -> None:
        for loaded in got:
            self.true(
                isinstance(loaded, BaseModel),
                f"{what}: returned a {type(loaded).__name__}, not a validated event model: {loaded!r:.200}",
            )
        self.equal([e.seq for e in got], [e.seq for e in expected], f"{what}: sequence numbers")
        for loaded, written in zip(got, expected, strict=True):
            self.true(
                type(loaded) is type(written),
                f"{what}: seq {written.seq} came back as {type(loaded).__name__}, not a validated "
                f"{type(written).__name__} event",
            )
            self.equal(loaded, written, f"{what}: event at seq {written.seq}")

    async def conflict(self, action: Awaitable[object], conversation_id: str, what: str) -> None:
        try:
            await action
        except ConflictError as exc:
            self.equal(exc.conversation_id, conversation_id, f"{what}: ConflictError.conversation_id")
            return
        raise self.fail(f"{what}: expected ConflictError, nothing was raised")


def _row_fields(row: ConversationRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in type(row).model_fields}


async def _empty(store: Store) -> None:
    check = _Checker(store, "a new store is empty")
    check.true(isinstance(store, Store), "it does not implement every method of the Store protocol")
    check.true(isinstance(store.url, str), "store.url is not a str")
    check.equal(await store.conversations(), [], "conversations()")
    check.equal(await store.get("nobody"), None, "get() of an unknown id")
    check.equal(await store.load("nobody"), [], "load() of an unknown id")
    check.equal(await store.next_wake_at(), None, "next_wake_at() with no conversations")
    check.equal(await store.due(at(10**6), 10), [], "due() with no conversations")
    check.equal(await store.acquire("nobody", "me", at(30), T0), None, "acquire() of an unknown id")
    check.equal(await store.release("nobody", "me", None), False, "release() of an unknown id")
    check.equal(await store.list_schedules(), [], "list_schedules()")
    check.equal(await store.get_schedule("nothing"), None, "get_schedule() of an unknown id")


async def _round_trip(store: Store) -> None:
    check = _Checker(store, "create/get/load round trip")
    events = every_event_kind()
    row = _row(
        "c/1 é",
        state="sleeping",
        wake_at=at(3600).astimezone(PARIS),
        last_seq=len(events),
        run=3,
        run_seq=1,
        result=JSON_SAMPLE,
        error="ValueError: no",
        parked=True,
        needs_advance=True,
        lease_owner="host:1:abc",
        lease_until=at(30),
        updated_at=at(17),
        tz="Asia/Kolkata",
    )
    await store.create(row, events)
    check.row(await store.get(row.id), _row_fields(row), "get() after create()")
    check.events(await store.load(row.id), events, "load() after create()")
    for after in (1, 7, len(events) - 1):
        check.events(await store.load(row.id, after), events[after:], f"load(after_seq={after})")
    check.equal(await store.load(row.id, len(events)), [], "load(after_seq=last_seq)")
    check.equal(await store.load(row.id, len(events) + 5), [], "load(after_seq past the end)")

    other = _row("c2", last_seq=2)
    await store.create(other, [_started(), _sent(2, "for c2 only")])
    check.events(await store.load(row.id), events, "load() of one conversation after another was created")
    check.events(await store.load("c2"), [_started(), _sent(2, "for c2 only")], "load() of the second conversation")
    check.equal(sorted(r.id for r in await store.conversations()), sorted([row.id, "c2"]), "ids of conversations()")
    logs = await store.load_logs(["c2", "nobody", row.id])
    check.equal(sorted(logs), sorted(["c2", "nobody", row.id]), "the ids of load_logs() (one entry for each id asked)")
    check.events(logs[row.id], events, "load_logs() of a conversation read with others")
    check.events(logs["c2"], [_started(), _sent(2, "for c2 only")], "load_logs() of the other conversation")
    check.equal(logs["nobody"], [], "load_logs() of an unknown id")
    check.equal(await store.load_logs([]), {}, "load_logs() of no ids")

    await check.conflict(
        store.create(_row(row.id, dialog="m:other"), [_started()]), row.id, "create() of an id that exists"
    )
    check.row(await store.get(row.id), _row_fields(row), "the row after a refused create()")
    check.events(await store.load(row.id), events, "the log after a refused create()")


async def _append(store: Store) -> None:
    check = _Checker(store, "append() with RowUpdate")
    cid = "talk"
    await store.create(_row(cid, tz="Europe/Paris", run=2, run_seq=1), [_started()])
    leased = await store.acquire(cid, "me", at(30), T0)
    check.true(leased is not None, "acquire() of a free conversation returned None")

    batch: list[Event] = [_sent(2), Waiting(seq=3, at=at(3), timeout_at=at(600))]
    returned = await store.append(
        cid, batch, RowUpdate(state="waiting_for_reply", wake_at=at(600), needs_advance=True, result=[1]), at(5)
    )
    expected = {
        "id": cid, "dialog": "m:bot", "state": "waiting_for_reply", "wake_at": at(600), "last_seq": 3,
        "run": 2, "run_seq": 1, "result": [1], "error": None, "parked": False, "needs_advance": True,
        "lease_owner": "me", "lease_until": at(30), "updated_at": at(5), "tz": "Europe/Paris",
    }  # fmt: skip
    check.row(returned, expected, "the row append() returned")
    check.row(await store.get(cid), expected, "get() after append() (the lease must survive an append)")
    check.events(await store.load(cid), [_started(), *batch], "load() after append()")

    returned = await store.append(cid, [_sent(4)], RowUpdate(error="E: x", result={"a": JSON_SAMPLE}), at(6))
    expected.update(last_seq=4, error="E: x", result={"a": JSON_SAMPLE}, updated_at=at(6))
    check.row(returned, expected, "append() whose RowUpdate leaves the other fields None (they must stay)")
    check.row(await store.get(cid), expected, "get() after an append() that sets only some fields")

    returned = await store.append(cid, [], RowUpdate(needs_advance=False, parked=True, state="sleeping"), at(7))
    expected.update(needs_advance=False, parked=True, state="sleeping", updated_at=at(7))
    check.row(returned, expected, "append() of no events (the row changes, last_seq stays)")
    check.row(await store.get(cid), expected, "get() after an append() of no events")

    returned = await store.append(
        cid, [_sent(5)], RowUpdate(parked=False, clear=frozenset({"wake_at", "result", "error"})), at(8)
    )
    expected.update(last_seq=5, parked=False, wake_at=None, result=None, error=None, updated_at=at(8))
    check.row(returned, expected, "append() with RowUpdate.clear (named fields become None)")
    check.row(await store.get(cid), expected, "get() after clearing fields")
    check.events(await store.load(cid, 3), [_sent(4), _sent(5)], "load(after_seq=3) after several appends")

    # Two writers both read last_seq 5; the first wins seq 6, the second must be refused whole.
    await store.append(cid, [_sent(6, "first writer")], RowUpdate(state="running"), at(9))
    expected.update(last_seq=6, state="running", updated_at=at(9))
    loser: list[Event] = [_sent(6, "second writer"), _sent(7, "second writer"), _sent(8, "second writer")]
    await check.conflict(
        store.append(cid, loser, RowUpdate(state="completed", wake_at=at(1)), at(10)),
        cid,
        "append() of a batch whose first seq another writer holds",
    )
    check.events(
        await store.load(cid, 4),
        [_sent(5), _sent(6, "first writer")],
        "the log after a conflicting append() (nothing of the refused batch may be written)",
    )
    check.row(await store.get(cid), expected, "the row after a conflicting append() (it must not change)")
    await check.conflict(
        store.append(cid, [_sent(3, "stale")], RowUpdate(), at(11)), cid, "append() at a seq long taken"
    )
    check.row(await store.get(cid), expected, "the row after a second conflicting append()")


async def _leases(store: Store) -> None:
    check = _Checker(store, "acquire()/release() leases")
    cid = "leased"
    await store.create(_row(cid, state="waiting_for_reply", wake_at=at(900)), [_started()])

    check.equal([row.id for row in await store.leased() if row.id == cid], [], "leased() before acquire()")
    got = await store.acquire(cid, "a", at(30), T0)
    check.row(got, {"lease_owner": "a", "lease_until": at(30), "last_seq": 1, "state": "waiting_for_reply"},
              "acquire() of a free lease")  # fmt: skip
    check.row(next((row for row in await store.leased() if row.id == cid), None),
              {"lease_owner": "a", "lease_until": at(30)}, "leased() after acquire()")  # fmt: skip
    check.row(
        await store.get(cid), {"lease_owner": "a", "lease_until": at(30), "wake_at": at(900)}, "get() after acquire()"
    )

    check.equal(await store.acquire(cid, "b", at(60), at(10)), None, "acquire() of a lease another owner holds")
    check.row(await store.get(cid), {"lease_owner": "a", "lease_until": at(30)}, "the lease after a refused acquire()")
    check.equal(
        await store.acquire(cid, "b", at(60), at(10), steal_from="someone else"),
        None,
        "acquire(steal_from=<not the holder>) of a held lease",
    )

    check.row(await store.acquire(cid, "a", at(40), at(10)), {"lease_owner": "a", "lease_until": at(40)},
              "acquire() of a lease we already hold (it is extended)")  # fmt: skip
    check.row(await store.acquire(cid, "b", at(100), at(41)), {"lease_owner": "b", "lease_until": at(100)},
              "acquire() of an expired lease")  # fmt: skip
    check.row(await store.acquire(cid, "c", at(130), at(50), steal_from="b"),
              {"lease_owner": "c", "lease_until": at(130)}, "acquire(steal_from=<the holder>)")  # fmt: skip

    check.equal(await store.release(cid, "b", None), False, "release() by an owner who lost the lease")
    check.row(await store.get(cid), {"lease_owner": "c"}, "the lease after a release() by a non-holder")
    check.equal(await store.release(cid, "c", 7), False, "release() when the log does not end at last_seq")
    check.row(await store.get(cid), {"lease_owner": "c", "lease_until": at(130)},
              "the lease after a release() with the wrong last_seq (it must be kept)")  # fmt: skip
    check.equal(await store.release(cid, "c", 1), True, "release() by the holder at the right last_seq")
    check.row(
        await store.get(cid), {"lease_owner": None, "lease_until": None, "last_seq": 1}, "the row after release()"
    )
    check.equal(await store.release(cid, "c", 1), False, "release() of a lease already released")
    check.equal([row.id for row in await store.leased() if row.id == cid], [], "leased() after release()")

    # The log moves while we hold the lease: release at the old end fails, at the new end (or None) succeeds.
    check.true(await store.acquire(cid, "a", at(200), at(60)) is not None, "acquire() of a released lease")
    await store.append(cid, [_sent(2)], RowUpdate(), at(61))
    check.equal(await store.release(cid, "a", 1), False, "release() at last_seq 1 after the log grew to 2")
    check.row(await store.get(cid), {"lease_owner": "a"}, "the lease after a release() the log outran")
    check.equal(await store.release(cid, "a", 2), True, "release() at the log's new end")
    check.true(await store.acquire(cid, "a", at(200), at(60)) is not None, "acquire() after release()")
    await store.append(cid, [_sent(3)], RowUpdate(), at(62))
    check.equal(await store.release(cid, "a", None), True, "release(last_seq=None) (unconditional)")
    check.row(await store.get(cid), {"lease_owner": None, "lease_until": None, "last_seq": 3, "wake_at": at(900)},
              "the row after leases came and went (nothing else may change)")  # fmt: skip

    # RowUpdate.release_owner may drop our lease with the write (a store may also ignore it), but never
    # another owner's, and the row append() returns must say which happened.
    check.true(await store.acquire(cid, "a", at(300), at(70)) is not None, "acquire() of a free lease")
    returned = await store.append(cid, [_sent(4)], RowUpdate(release_owner="b"), at(71))
    check.row(returned, {"lease_owner": "a", "lease_until": at(300)}, "append(release_owner=<not the holder>)")
    check.row(await store.get(cid), {"lease_owner": "a"}, "the lease after append(release_owner=<not the holder>)")
    returned = await store.append(cid, [_sent(5)], RowUpdate(release_owner="a"), at(72))
    check.true(returned is not None, "append() returned None for an update that is not provisional")
    assert returned is not None
    check.true(
        returned.lease_owner in ("a", None),
        f"append(release_owner=<the holder>) gave the lease to {returned.lease_owner}",
    )
    stored = await store.get(cid)
    check.row(stored, {"lease_owner": returned.lease_owner, "lease_until": returned.lease_until, "last_seq": 5},
              "get() after append(release_owner=<the holder>) (it must match the row append() returned)")  # fmt: skip
    await store.release(cid, "a", None)
    returned = await store.append(cid, [_sent(6)], RowUpdate(release_owner="a"), at(73))
    check.row(returned, {"lease_owner": None, "last_seq": 6}, "append(release_owner=...) with no lease held")

    # A provisional update (the runner's append just before a hand-off, lease held) may return None instead
    # of the row; the row is right once the next write of the conversation is made.
    check.true(await store.acquire(cid, "a", at(400), at(74)) is not None, "acquire() of a free lease")
    returned = await store.append(cid, [_sent(7)], RowUpdate(state="sleeping", provisional=True), at(75))
    check.true(returned is None or returned.last_seq == 7, "append(provisional=True) gives None or the new row")
    returned = await store.append(cid, [_sent(8)], RowUpdate(release_owner="a"), at(76))
    check.row(await store.get(cid), {"last_seq": 8, "state": "sleeping", "lease_owner": None},
              "the row after a provisional append and the write after it")  # fmt: skip


async def _acquire_many(store: Store) -> None:
    check = _Checker(store, "acquire_many()")
    rows: dict[str, dict[str, Any]] = {
        "free": {},
        "expired": {"lease_owner": "dead", "lease_until": at(99)},
        "expires-now": {"lease_owner": "dead", "lease_until": at(100)},
        "held": {"lease_owner": "other", "lease_until": at(101)},
        "ours-live": {"lease_owner": "a", "lease_until": at(500)},
        "free-too": {},
    }
    for cid, fields in rows.items():
        await store.create(_row(cid, state="sleeping", wake_at=at(0), **fields), [_started()])
    asked = ["free-too", "unknown", "held", "expired", "ours-live", "expires-now", "free"]
    taken = await store.acquire_many(asked, "a", at(130), at(100))
    check.equal(
        taken,
        ["free-too", "expired", "expires-now", "free"],
        "the ids taken (free or expired at now, in the order asked; not a live lease, ours included)",
    )
    for cid in taken:
        check.row(await store.get(cid), {"lease_owner": "a", "lease_until": at(130), "last_seq": 1, "wake_at": at(0)},
                  f"the row of {cid!r} after acquire_many() took it")  # fmt: skip
    check.row(await store.get("held"), {"lease_owner": "other", "lease_until": at(101)}, "a live lease not taken")
    check.row(await store.get("ours-live"), {"lease_owner": "a", "lease_until": at(500)}, "our live lease untouched")
    check.equal(await store.get("unknown"), None, "an unknown id after acquire_many() (nothing may be created)")
    check.equal(await store.acquire_many(asked, "b", at(160), at(100)), [], "acquire_many() of live leases")
    check.equal(await store.acquire_many([], "b", at(160), at(110)), [], "acquire_many([])")
    check.true("free" not in await store.due(at(110), 100), "due() lists a conversation acquire_many() took")
    check.equal(await store.release("free", "a", None), True, "release() of a lease acquire_many() took")

    # Runners claiming the same due ids at once: each id goes to exactly one of them.
    many = [f"raced-{n}" for n in range(12)]
    for cid in many:
        await store.create(_row(cid, state="sleeping", wake_at=at(0)), [_started()])
    won: dict[str, list[str]] = {}

    async def claim_as(owner: str, order: list[str]) -> None:
        won[owner] = await store.acquire_many(order, owner, at(200), at(150))

    async with anyio.create_task_group() as group:
        for runner in range(6):
            group.start_soon(claim_as, f"runner-{runner}", many[runner:] + many[:runner])
    every = [cid for ids in won.values() for cid in ids]
    check.equal(sorted(every), sorted(many), f"ids taken by 6 concurrent acquire_many() calls ({won})")
    for owner, ids in won.items():
        for cid in ids:
            check.row(await store.get(cid), {"lease_owner": owner}, f"the lease of {cid!r} taken by {owner}")


async def _claims(store: Store) -> None:
    check = _Checker(store, "append() with RowUpdate(claim=...)")
    cid = "claimed"
    await store.create(_row(cid, state="waiting_for_reply"), [_started()])

    def claim(owner: str, last_seq: int, seconds: float, run_seq: int = 1) -> Claim:
        return Claim(owner=owner, until=at(seconds + 30), now=at(seconds), last_seq=last_seq, run_seq=run_seq)

    async def refused(update: RowUpdate, what: str) -> None:
        """The claim alone must stop it: the batch starts at the next free sequence number."""
        before, log = await store.get(cid), await store.load(cid)
        assert before is not None
        await check.conflict(store.append(cid, [_sent(before.last_seq + 1)], update, at(50)), cid, what)
        check.events(await store.load(cid), log, f"the log after {what} (nothing may be written)")
        check.equal(await store.get(cid), before, f"the row after {what} (nothing may change)")

    returned = await store.append(cid, [_sent(2)], RowUpdate(state="sleeping", claim=claim("a", 1, 10)), at(10))
    check.row(returned, {"lease_owner": "a", "lease_until": at(40), "last_seq": 2, "state": "sleeping"},
              "append(claim) of a row as expected (the lease is taken with the events)")  # fmt: skip
    check.row(await store.get(cid), {"lease_owner": "a", "lease_until": at(40)}, "get() after append(claim)")
    await refused(RowUpdate(claim=claim("b", 2, 20)), "append(claim) while another owner's lease is live")
    returned = await store.append(cid, [_sent(3)], RowUpdate(claim=claim("a", 2, 20)), at(20))
    check.row(returned, {"lease_owner": "a", "lease_until": at(50), "last_seq": 3}, "append(claim) of our own lease")
    returned = await store.append(cid, [_sent(4)], RowUpdate(claim=claim("b", 3, 60)), at(60))
    check.row(returned, {"lease_owner": "b", "lease_until": at(90), "last_seq": 4}, "append(claim) of an expired lease")
    await store.release(cid, "b", None)

    await refused(RowUpdate(claim=claim("a", 3, 100)), "append(claim) when the log moved past last_seq")
    await refused(RowUpdate(claim=claim("a", 4, 100, run_seq=2)), "append(claim) in another run")
    await store.append(cid, [], RowUpdate(needs_advance=True), at(100))
    await refused(RowUpdate(claim=claim("a", 4, 100)), "append(claim) of a row flagged needs_advance")
    await store.append(cid, [], RowUpdate(needs_advance=False, parked=True), at(100))
    await refused(RowUpdate(claim=claim("a", 4, 100)), "append(claim) of a parked row")
    await store.append(cid, [], RowUpdate(parked=False), at(100))

    returned = await store.append(cid, [_sent(5)], RowUpdate(claim=claim("a", 4, 110), release_owner="a"), at(110))
    check.row(returned, {"lease_owner": None, "lease_until": None, "last_seq": 5},
              "append(claim, release_owner=<the claimer>) (checked, and the lease left free)")  # fmt: skip
    check.row(await store.get(cid), {"lease_owner": None, "last_seq": 5}, "get() after append(claim, release)")
    check.events(await store.load(cid, 1), [_sent(n) for n in (2, 3, 4, 5)], "the log after the claims")


async def _due(store: Store) -> None:
    check = _Checker(store, "due() and next_wake_at()")
    now = at(1000)
    rows: dict[str, dict[str, Any]] = {
        "wake-earliest": {"wake_at": at(-5000), "state": "sleeping"},
        "wake-past": {"wake_at": at(500), "state": "sleeping"},
        "wake-now": {"wake_at": now, "state": "waiting_for_reply"},
        "wake-future": {"wake_at": at(1001), "state": "sleeping"},
        "idle": {"state": "waiting_for_reply"},
        "input": {"needs_advance": True, "state": "waiting_for_reply"},
        "input-and-later-wake": {"needs_advance": True, "wake_at": at(9000), "state": "sleeping"},
        "expired-lease": {"lease_owner": "dead", "lease_until": at(999), "state": "running"},
        "leased-wake": {"wake_at": at(100), "lease_owner": "busy", "lease_until": at(1030)},
        "leased-input": {"needs_advance": True, "lease_owner": "busy", "lease_until": at(1030)},
        "done": {"state": "completed", "result": 1},
    }
    for cid in ("wake-future", "input", "wake-now", "done", "wake-earliest", "idle"):  # not in id or time order
        await store.create(_row(cid, **rows[cid]), [_started()])
    for cid in rows:
        if await store.get(cid) is None:
            await store.create(_row(cid, **rows[cid]), [_started()])

    wanted = {"wake-earliest", "wake-past", "wake-now", "input", "input-and-later-wake", "expired-lease"}
    due = await store.due(now, 100)
    check.equal(len(due), len(set(due)), f"due() listed an id twice: {due}")
    check.equal(set(due), wanted, "the ids due() returns (wake_at <= now, needs_advance or expired lease; not leased)")
    wake_order = [cid for cid in due if cid in ("wake-earliest", "wake-past", "wake-now")]
    check.equal(wake_order, ["wake-earliest", "wake-past", "wake-now"], "due() order (soonest wake_at first)")
    limited = await store.due(now, 2)
    check.true(len(limited) == 2 and set(limited) <= wanted, f"due(limit=2) returned {limited}")

    check.equal(await store.next_wake_at(), at(-5000), "next_wake_at()")
    check.equal(await store.next_wake_at(after=at(500)), now, "next_wake_at(after=...) (later than it only)")
    check.equal(await store.next_wake_at(after=at(-5001)), at(-5000), "next_wake_at(after=...) just before one")
    check.equal(await store.next_wake_at(after=at(9000)), None, "next_wake_at(after=...) past every wake_at")
    await store.append("wake-earliest", [_sent(2)], RowUpdate(clear=frozenset({"wake_at"})), now)
    check.equal(await store.next_wake_at(), at(100), "next_wake_at() after the earliest wake_at was cleared")
    check.true("wake-earliest" not in await store.due(now, 100), "due() lists a row whose wake_at was cleared")
    check.true("wake-future" in await store.due(at(1001), 100), "due() at a later now misses a wake_at that came due")

    check.true(await store.acquire("wake-past", "me", at(1030), now) is not None, "acquire() of a due conversation")
    check.true("wake-past" not in await store.due(now, 100), "due() lists a conversation whose lease is held")
    check.true("wake-past" in await store.due(at(1031), 100), "due() misses a conversation whose lease expired")
    await store.release("wake-past", "me", None)
    check.true("wake-past" in await store.due(now, 100), "due() misses a conversation whose lease was released")
    await store.append("input", [ReplyReceived(seq=2, at=now, text="x")], RowUpdate(needs_advance=False), now)
    check.true("input" not in await store.due(now, 100), "due() lists a row whose needs_advance was set False")
    check.equal(
        set(await store.due(at(550), 100)),
        {"wake-past", "input-and-later-wake"},
        "due() at an earlier now (a lease expiring later is not expired yet)",
    )


async def _races(store: Store) -> None:
    check = _Checker(store, "concurrent writers")
    cid = "raced"
    await store.create(_row(cid), [_started()])
    writers = 8
    won: list[int] = []
    lost: list[int] = []

    async def append_as(writer: int) -> None:
        try:
            await store.append(cid, [_sent(2, f"writer {writer}")], RowUpdate(error=f"writer {writer}"), at(writer))
        except ConflictError:
            lost.append(writer)
        else:
            won.append(writer)

    async with anyio.create_task_group() as group:
        for writer in range(writers):
            group.start_soon(append_as, writer)
    check.equal(len(won), 1, f"appends of seq 2 by {writers} concurrent writers that succeeded (losers: {lost})")
    check.events(await store.load(cid), [_started(), _sent(2, f"writer {won[0]}")], "the log after the race")
    check.row(await store.get(cid), {"last_seq": 2, "error": f"writer {won[0]}"}, "the row after the race")

    owners: list[str] = []

    async def acquire_as(owner: str) -> None:
        if await store.acquire(cid, owner, at(60), at(1)) is not None:
            owners.append(owner)

    async with anyio.create_task_group() as group:
        for writer in range(writers):
            group.start_soon(acquire_as, f"runner-{writer}")
    check.equal(len(owners), 1, f"leases taken by {writers} concurrent acquire() calls ({owners})")
    check.row(await store.get(cid), {"lease_owner": owners[0]}, "the lease after the race")


async def _conversations(store: Store) -> None:
    check = _Checker(store, "conversations(state)")
    states: dict[str, Any] = {"a": "sleeping", "b": "completed", "c": "sleeping", "d": "failed", "e": "running"}
    for cid, state in states.items():
        await store.create(_row(cid, state=state, error="E: x" if state == "failed" else None), [_started()])
    all_rows = await store.conversations()
    check.equal(sorted(r.id for r in all_rows), sorted(states), "ids of conversations()")
    for row in all_rows:
        check.row(row, {"state": states[row.id], "last_seq": 1, "dialog": "m:bot"}, f"conversations() row {row.id!r}")
    every_state: list[State] = ["sleeping", "completed", "failed", "running", "waiting_for_reply"]
    for state in every_state:
        got = sorted(r.id for r in await store.conversations(state))
        check.equal(got, sorted(cid for cid, s in states.items() if s == state), f"ids of conversations({state!r})")
    await store.append("e", [_sent(2)], RowUpdate(state="completed", result="ok"), at(1))
    check.equal(sorted(r.id for r in await store.conversations("completed")), ["b", "e"],
                "conversations('completed') after a row changed state")  # fmt: skip


def _schedule(schedule_id: str, next_at: datetime | None, **fields: Any) -> ScheduleRow:
    return ScheduleRow(
        id=schedule_id, dialog="m:bot", conversation_id=f"conv-{schedule_id}", next_at=next_at, created_at=T0,
        **fields,
    )  # fmt: skip


async def _schedules(store: Store) -> None:
    check = _Checker(store, "schedules")
    daily = _schedule(
        "daily", at(3600).astimezone(PARIS), every="every day at 9am", tz="Europe/Paris",
        dialog_args=[1, JSON_SAMPLE], dialog_kwargs={"name": "Ann"}, missed="skip", grace_seconds=60.0,
    )  # fmt: skip
    await store.put_schedule(daily)
    check.row(await store.get_schedule("daily"), dict(daily), "get_schedule() after put_schedule()")
    await check.conflict(store.put_schedule(_schedule("daily", None)), "daily", "put_schedule() of an id that exists")
    check.row(await store.get_schedule("daily"), dict(daily), "a schedule after a refused put_schedule()")
    await store.put_schedule(_schedule("once", at(60)))
    await store.put_schedule(_schedule("spent", None, fired=1, last_fired_at=at(5)))
    await store.put_schedule(_schedule("early", at(-60)))
    check.equal([s.id for s in await store.list_schedules()], ["early", "once", "daily", "spent"],
                "list_schedules() order (soonest next_at first, none last)")  # fmt: skip
    check.equal(await store.next_wake_at(), at(-60), "next_wake_at() with schedules and no conversations")
    check.equal(await store.next_wake_at(after=at(-60)), at(60), "next_wake_at(after=...) with schedules")

    check.equal([s.id for s in await store.due_schedules(at(60), 10)], ["early", "once"], "due_schedules() at next_at")
    check.equal([s.id for s in await store.due_schedules(at(60), 1)], ["early"], "due_schedules(limit=1)")
    check.row(await store.claim_schedule("once", "a", at(90), at(60)), {"lease_owner": "a", "lease_until": at(90)},
              "claim_schedule() of a free schedule")  # fmt: skip
    check.equal(await store.claim_schedule("once", "b", at(95), at(61)), None, "claim_schedule() of a held schedule")
    check.equal([s.id for s in await store.due_schedules(at(61), 10)], ["early"], "due_schedules() skips held ones")
    check.row(await store.claim_schedule("once", "a", at(99), at(62)), {"lease_owner": "a", "lease_until": at(99)},
              "claim_schedule() of a schedule we hold")  # fmt: skip
    check.equal(await store.finish_schedule("once", "b", None, 1, at(62)), False, "finish_schedule() by a non-holder")
    check.row(await store.claim_schedule("once", "b", at(150), at(100)), {"lease_owner": "b"},
              "claim_schedule() of an expired lease")  # fmt: skip
    check.equal(await store.finish_schedule("once", "b", None, 1, at(100)), True, "finish_schedule() by the holder")
    check.row(await store.get_schedule("once"),
              {"next_at": None, "fired": 1, "last_fired_at": at(100), "lease_owner": None, "lease_until": None,
               "conversation_id": "conv-once"}, "a schedule after finish_schedule()")  # fmt: skip
    check.equal(await store.claim_schedule("missing", "a", at(90), at(60)), None, "claim_schedule() of an unknown id")

    check.equal(await store.delete_schedule("early"), True, "delete_schedule() of a schedule")
    check.equal(await store.delete_schedule("early"), False, "delete_schedule() of a deleted schedule")
    check.equal(await store.get_schedule("early"), None, "get_schedule() after delete_schedule()")
    check.equal([s.id for s in await store.list_schedules()], ["daily", "once", "spent"], "list_schedules() after all")


_GROUPS: tuple[Callable[[Store], Awaitable[None]], ...] = (
    _empty,
    _round_trip,
    _append,
    _leases,
    _due,
    _acquire_many,
    _conversations,
    _races,
    _schedules,
    _claims,
)


async def check_store(make_store: StoreFactory) -> None:
    """Run the store conformance suite; ``AssertionError`` names the first broken promise.

    ``make_store`` is an async callable returning a new, empty store each time it
    is called (a fresh database or file); each group of checks gets its own and
    closes it. It checks:

    * every event kind survives ``create``/``load`` as a validated event of the
      same kind and value; ``get`` returns the row as written; ``load(after_seq)``;
      ``load_logs`` gives each conversation's whole log, ``[]`` for an unknown id;
      ``leased`` gives the rows holding a lease;
    * ``append`` writes its events and applies the ``RowUpdate`` (set fields,
      ``clear``, ``last_seq``, ``updated_at``) without touching the lease;
    * a taken sequence number raises ``ConflictError`` and writes nothing (no
      event of the batch, no row change); so does ``create`` of an existing id;
    * leases: free, ours, expired and ``steal_from`` are taken, a live one
      held by another is not; ``release`` checks the owner and ``last_seq``
      (``None``: unconditional); ``RowUpdate.release_owner`` never drops
      another owner's lease, and ``append`` returns the lease as stored;
    * ``acquire_many``: takes the free and expired leases of the ids given (never a live one, ours included,
      nor an unknown id), returns them in the order given; concurrent calls split the ids between them;
    * ``RowUpdate.claim``: the append happens, taking the lease, only while the
      row is as claimed (last_seq, run, not parked or flagged, lease free, ours
      or expired); otherwise ``ConflictError`` and nothing written;
    * ``due``: ``wake_at <= now``, ``needs_advance`` or an expired lease,
      never a live lease, soonest first, at most ``limit``; ``next_wake_at``;
      ``conversations(state)``;
    * concurrent writers of one sequence number: exactly one wins; concurrent
      ``acquire`` calls: exactly one holds the lease;
    * schedules: put (``ConflictError`` on a taken id), get, list order, due,
      claim, finish, delete.
    """
    for group in _GROUPS:
        store = await make_store()
        try:
            await group(store)
        finally:
            await store.close()
