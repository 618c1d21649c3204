"""Reminders: a bot that speaks first, at the times the user asks for.

Run it with ``dynaprompt chat examples/reminders.py`` and write, for example::

    Europe/Paris
    remind me in 20 minutes to call Sam
    remind me tomorrow at 9am to water the plants
    remind me to stretch every weekday at 10am
    list
    cancel 2
    my timezone is America/New_York

The bot asks for the user's IANA time zone once (``set_timezone``, so every
natural-language time of the conversation is read on the user's wall clock)
and accepts "my timezone is ..." at any time later.

How it stays durable and replay-safe (the design, and why it is the simplest
one that is):

* **The whole bot is one conversation**, and its state (the numbered list of
  reminders) lives in local variables. Nothing else stores it: replay rebuilds
  it from the log, so it survives restarts for free.
* **Times are understood once, inside** ``call(plan_reminder, ...)``. The
  function reads the request with dateparser (through
  :func:`dynaprompt.timeparse.parse_instant`) or the recurrence grammar of
  :mod:`dynaprompt.recurrence`, against the reply's recorded time, and returns
  the resolved instant as data. Its result is recorded, so a replay (or a new
  version of dateparser) never re-reads the text. A time it cannot understand
  comes back as an error text (it catches ``TimeParseError`` and
  ``RecurrenceError``) that the bot turns into a polite answer.
* **One-off reminders are scheduled sends**: ``send(text, at=instant)`` is
  recorded at once and delivered when due, by whichever runner is up then (late,
  with ``due_at`` in its metadata, if none was). ``cancel(message_id)`` takes it
  back; its result says whether it was still undelivered.
* **Recurring reminders are the timeout of the wait**: between messages the
  bot waits with ``wait_for_reply(timeout=...)`` until the earliest next
  occurrence. When the wait times out, it sends each due reminder (as a send
  ``at`` its occurrence, so ``due_at`` shows when it was meant for) and asks
  ``call(next_occurrence, ...)`` for the following one. Missed occurrences
  (every runner down for days) are coalesced into one message per reminder.
  Each reminder keeps the zone it was made in; calendar recurrences stay on the
  local wall clock across daylight-saving changes.

A dialog cannot call ``Runner.schedule`` (that would be a side effect outside
the log); a scheduled *conversation* is the tool when the bot should start a
new dialog, which a reminder does not need.

The log grows by a few events per reminder fired; a bot meant to run for
years would end its run now and then and let the app start a fresh one.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from dynaprompt import call, cancel, dialog, now, send, set_timezone, wait_for_reply
from dynaprompt.errors import RecurrenceError, TimeParseError, UnknownTimeZoneError
from dynaprompt.recurrence import parse_recurrence
from dynaprompt.timeparse import parse_duration, parse_instant, zone

EXAMPLES = (
    "Tell me things like 'remind me in 20 minutes to call Sam', 'remind me tomorrow at 9am to water the "
    "plants' or 'remind me to stretch every weekday at 10am'."
)
HELP = (
    f"{EXAMPLES} Say 'list' to see your reminders, 'cancel 2' to drop one, and 'my timezone is Europe/Paris' "
    "to change your time zone."
)
_REMIND = re.compile(r"^\s*remind\s+me\s+(?P<rest>.+?)[\s.!]*$", re.IGNORECASE | re.DOTALL)
# Where a time can begin after "remind me to <what>": the first split whose tail reads as a time wins.
_WHEN_WORDS = re.compile(r"\b(?:every|daily|in|at|on|tomorrow|today|tonight|next|this)\b", re.IGNORECASE)
_MY_ZONE = re.compile(r"^\s*(?:my\s+)?time\s*zone(?:\s+is)?\s*:?\s*(?P<zone>\S+?)[\s.!]*$", re.IGNORECASE)
_ZONE_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+)*$")
_CANCEL = re.compile(r"^\s*(?:cancel|delete|remove)\s+(?:reminder\s+)?#?(?P<number>\d+)[\s.!]*$", re.IGNORECASE)


# -- pure helpers, run inside call() so that their results are recorded ------------------------------


def plan_reminder(request: str, now_iso: str, tz: str) -> dict[str, Any]:
    """Understand ``request`` ("remind me ...") at ``now_iso`` in zone ``tz``.

    Returns ``{"what", "at"}`` for a one-off reminder, ``{"what", "every",
    "next_at", "anchor"}`` for a recurring one (ISO instants), or ``{"error"}``
    with a sentence for the user.

    >>> plan_reminder("remind me in 20 minutes to call Sam", "2026-01-05T09:00:00+00:00", "UTC")
    {'what': 'call Sam', 'at': '2026-01-05T09:20:00+00:00'}
    >>> plan_reminder("remind me to stretch every weekday at 10am", "2026-01-05T09:00:00+00:00", "UTC")["next_at"]
    '2026-01-05T10:00:00+00:00'
    """
    match = _REMIND.match(request)
    if match is None:
        return {"error": "Start with 'remind me', for example 'remind me in 20 minutes to call Sam'."}
    rest = match.group("rest")
    splits: list[tuple[str, str]] = []
    if rest.lower().startswith("to "):  # remind me to <what> <when>
        body = rest[3:]
        splits = [(body[: m.start()], body[m.start() :]) for m in _WHEN_WORDS.finditer(body)]
    else:  # remind me <when> to <what>
        splits = [(rest[m.end() :], rest[: m.start()]) for m in re.finditer(r"\s+to\s+", rest, re.IGNORECASE)]
    current = datetime.fromisoformat(now_iso)
    problem = "I found no time in it"
    for what, when in splits:
        what, when = what.strip(" ,"), when.strip(" ,")
        if not what or not when:
            continue
        try:
            return _plan(what, when, current, tz)
        except (TimeParseError, RecurrenceError) as exc:
            problem = str(exc)
        except _PastError as exc:
            return {"error": str(exc)}
    return {"error": f"Sorry, I couldn't work out when to remind you ({problem}). {EXAMPLES}"}


class _PastError(Exception):
    pass


def _plan(what: str, when: str, current: datetime, tz: str) -> dict[str, Any]:
    if when.lower().startswith(("every ", "daily ")):
        recurrence = parse_recurrence(when)
        first = recurrence.next_after(current, tz, anchor=current)  # an interval counts from now
        return {"what": what, "every": when, "next_at": first.isoformat(), "anchor": current.isoformat()}
    if when.lower().startswith("in "):
        # Strict: "in" must be followed by a duration, so "check in at 5pm" splits before "at".
        instant = current + parse_duration(when[3:])
    else:
        instant = parse_instant(when, current, tz)
    if instant <= current:
        shown = describe(instant.isoformat(), tz)
        raise _PastError(f"Sorry, {when!r} is {shown}, which has already passed. Give me a time in the future.")
    return {"what": what, "at": instant.astimezone(zone(tz)).isoformat()}


def next_occurrence(every: str, after_iso: str, tz: str, anchor_iso: str) -> str:
    """The first occurrence of ``every`` (in ``tz``) strictly after ``after_iso``, as ISO text.

    >>> next_occurrence("every day at 9am", "2026-01-05T09:00:00+00:00", "Europe/London", "2026-01-01T00:00:00+00:00")
    '2026-01-06T09:00:00+00:00'
    """
    after, anchor = datetime.fromisoformat(after_iso), datetime.fromisoformat(anchor_iso)
    return parse_recurrence(every).next_after(after, tz, anchor=anchor).isoformat()


def describe(iso: str, tz: str) -> str:
    """An instant as the user reads it on their wall clock.

    >>> describe("2026-03-30T09:00:00+00:00", "Europe/London")
    'Monday 30 March at 10:00 BST'
    """
    local = datetime.fromisoformat(iso).astimezone(zone(tz))
    return f"{local:%A} {local.day} {local:%B} at {local:%H:%M} {local.tzname()}"


# -- the dialog ------------------------------------------------------------------------------------


@dialog(name="reminders")
async def reminders():
    """Ask the user's zone, then take reminder requests, list and cancel them, and send them when due."""
    yield send("Hi! I'm your reminder bot. Which time zone are you in? (for example Europe/Paris)")
    tz = "UTC"
    first = yield wait_for_reply()
    pending: Any = None  # a first message that was a request, not a zone: handled in the loop
    asked = _zone_in(first.text) or first.text.strip()
    known = False
    if _ZONE_LIKE.match(asked):
        try:
            yield set_timezone(asked)
            tz, known = asked, True
        except UnknownTimeZoneError:
            pass
    if known:
        yield send(f"Got it: times are in {tz}. {HELP}")
    elif _REMIND.match(first.text):
        pending = first
        yield send("I'll use UTC until you tell me your time zone ('my timezone is Europe/Paris').")
    else:
        yield send(
            f"I don't know the time zone {asked!r}, so I'll use UTC; say 'my timezone is Europe/Paris' to change it."
        )

    items: list[dict[str, Any]] = []  # each: number, what, tz, and at + message_id, or every + next_at + anchor
    numbers = 0
    while True:
        if pending is not None:
            reply, pending = pending, None
        else:
            current = yield now()
            upcoming = [datetime.fromisoformat(item["next_at"]) for item in items if "every" in item]
            timeout = max(min(upcoming) - current, timedelta(0)) if upcoming else None
            reply = yield wait_for_reply(timeout=timeout)
        if reply is None:  # the earliest recurring reminder is due
            current = yield now()
            for item in items:
                if "every" in item and datetime.fromisoformat(item["next_at"]) <= current:
                    yield send(f"Reminder: {item['what']}", at=datetime.fromisoformat(item["next_at"]))
                    item["next_at"] = yield call(
                        next_occurrence, item["every"], current.isoformat(), item["tz"], item["anchor"]
                    )
            continue
        text = reply.text.strip()
        # One-off reminders whose time has come were delivered by the runner: drop them from the list.
        items = [item for item in items if "every" in item or datetime.fromisoformat(item["at"]) > reply.at]
        if (new_zone := _zone_in(text)) is not None:
            try:
                yield set_timezone(new_zone)
            except UnknownTimeZoneError:
                yield send(f"I don't know the time zone {new_zone!r}. Try an IANA name such as America/New_York.")
                continue
            tz = new_zone
            yield send(f"Got it: times are now in {tz}. Reminders you already have keep their time zone.")
        elif text.lower() in ("list", "list reminders", "reminders", "show reminders"):
            yield send(_listing(items))
        elif (cancelling := _CANCEL.match(text)) is not None:
            number = int(cancelling.group("number"))
            found = next((item for item in items if item["number"] == number), None)
            if found is None:
                yield send(f"You have no reminder {number}. Say 'list' to see them.")
                continue
            items.remove(found)
            if "every" in found:
                yield send(f"Cancelled reminder {number}: {found['what']} ({found['every']}).")
            elif (yield cancel(found["message_id"])):
                yield send(f"Cancelled reminder {number}: {found['what']}.")
            else:
                yield send(f"Reminder {number} ({found['what']}) was already sent.")
        elif _REMIND.match(text):
            plan = yield call(plan_reminder, text, reply.at.isoformat(), tz)
            if "error" in plan:
                yield send(plan["error"])
                continue
            numbers += 1
            item = {"number": numbers, "tz": tz, **plan}
            if "every" in plan:
                first_at = describe(plan["next_at"], tz)
                yield send(
                    f"OK, I'll remind you to {plan['what']} {plan['every']} (reminder {numbers}), first on {first_at}."
                )
            else:
                item["message_id"] = yield send(f"Reminder: {plan['what']}", at=datetime.fromisoformat(plan["at"]))
                yield send(f"OK, I'll remind you to {plan['what']} on {describe(plan['at'], tz)} (reminder {numbers}).")
            items.append(item)
        elif text.lower() in ("help", "?"):
            yield send(HELP)
        else:
            yield send(f"Sorry, I didn't get that. {HELP}")


def _zone_in(text: str) -> str | None:
    match = _MY_ZONE.match(text)
    return match.group("zone") if match else None


def _listing(items: list[dict[str, Any]]) -> str:
    if not items:
        return f"You have no reminders. {EXAMPLES}"
    lines = ["Your reminders:"]
    for item in sorted(items, key=lambda item: item["number"]):
        if "every" in item:
            lines.append(
                f"{item['number']}. {item['what']}: {item['every']}, next on {describe(item['next_at'], item['tz'])}"
            )
        else:
            lines.append(f"{item['number']}. {item['what']}: on {describe(item['at'], item['tz'])}")
    return "\n".join(lines)


# What ``dynaprompt chat examples/reminders.py`` runs.
main = reminders
