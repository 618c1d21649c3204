"""Effect constructors: the effect they give is the one the validating model gives, and bad values still fail.

The constructors skip the model's validation when every value already has its field's exact type (replay
calls them once per recorded effect); these tests hold the shortcut to the model's own result.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from dynaprompt import call, cancel, finish, now, send, sleep, sleep_until, wait_for_reply
from dynaprompt.effects import (
    Call,
    Cancel,
    Now,
    Send,
    SetTimezone,
    Sleep,
    SleepUntil,
    WaitForReply,
    set_timezone,
)
from dynaprompt.errors import InvalidInputError, NotTextError


def lookup(city: str, *, units: str = "metric") -> str:
    return city


class Label(str):
    pass


INSTANT = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)

SAME_AS_THE_MODEL: list[tuple[BaseModel, BaseModel]] = [
    (send("hi"), Send(text="hi", at=None, to=None, metadata={})),
    (send("hi", to="bob"), Send(text="hi", to="bob", metadata={})),
    (send("hi", metadata={}), Send(text="hi", metadata={})),
    (send("hi", at="tomorrow at 9am"), Send(text="hi", at="tomorrow at 9am")),
    (send("hi", metadata={"k": [1, 2]}), Send(text="hi", metadata={"k": [1, 2]})),
    (send(Label("hi")), Send(text=Label("hi"))),
    (wait_for_reply(), WaitForReply(timeout=None)),
    (wait_for_reply(timeout="2 hours"), WaitForReply(timeout="2 hours")),
    (sleep_until("tomorrow at 9am"), SleepUntil(when="tomorrow at 9am")),
    (sleep_until(INSTANT), SleepUntil(when=INSTANT)),
    (sleep(90.0), Sleep(duration=90.0)),
    (sleep(90), Sleep(duration=90)),
    (sleep("90 minutes"), Sleep(duration="90 minutes")),
    (sleep(timedelta(minutes=90)), Sleep(duration=timedelta(minutes=90))),
    (now(), Now()),
    (call(lookup, "Paris", units="imperial"), Call(fn=lookup, arguments=("Paris",), keywords={"units": "imperial"})),
    (call(lookup, "Paris").with_retries(2), Call(fn=lookup, arguments=("Paris",), retries=2)),
    (cancel("c1:4"), Cancel(message_id="c1:4")),
    (set_timezone("Europe/Paris"), SetTimezone(zone="Europe/Paris")),
]


@pytest.mark.parametrize(("built", "validated"), SAME_AS_THE_MODEL, ids=lambda effect: repr(effect)[:40])
def test_a_constructor_gives_the_models_own_effect(built: BaseModel, validated: BaseModel) -> None:
    assert type(built) is type(validated)
    assert built == validated
    assert repr(built) == repr(validated)
    assert list(built.__dict__) == list(validated.__dict__)
    assert [type(value) for value in built.__dict__.values()] == [type(value) for value in validated.__dict__.values()]
    assert built.model_dump() == validated.model_dump()
    assert built.key() == validated.key()  # type: ignore[attr-defined]


def test_effects_are_frozen_and_hold_their_own_containers() -> None:
    metadata: dict[str, Any] = {}
    message = send("hi", metadata=metadata)
    metadata["later"] = True
    assert message.metadata == {}
    assert send("a").metadata is not send("b").metadata
    with pytest.raises(ValidationError):
        message.text = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        wait_for_reply().timeout = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "error", "named"),
    [
        (lambda: send(42), NotTextError, "must be a str"),  # type: ignore[arg-type]
        (lambda: send("hi", at=5), InvalidInputError, "send(at=...)"),  # type: ignore[arg-type]
        (lambda: call("not callable"), InvalidInputError, "call()"),  # type: ignore[arg-type]
        (lambda: send("hi", to=5), InvalidInputError, "send(): to=5"),  # type: ignore[arg-type]
        (lambda: send("hi", metadata={"k": object()}), InvalidInputError, "send(): metadata="),  # type: ignore[dict-item]
        (lambda: send("hi", metadata=[1]), InvalidInputError, "send(): metadata=[1]"),  # type: ignore[arg-type]
        (lambda: wait_for_reply(timeout=[1]), InvalidInputError, "wait_for_reply(): timeout=[1]"),  # type: ignore[arg-type]
        (lambda: sleep_until([1]), InvalidInputError, "sleep_until(): when=[1]"),  # type: ignore[arg-type]
        (lambda: sleep_until(5), InvalidInputError, "sleep_until(when=...)"),  # type: ignore[arg-type]
        (lambda: sleep_until(1.5e9), InvalidInputError, "sleep_until(when=...)"),  # type: ignore[arg-type]
        (lambda: sleep([1]), InvalidInputError, "sleep(): duration=[1]"),  # type: ignore[arg-type]
        (lambda: finish({1, 2}), InvalidInputError, "finish(): value="),
        (lambda: cancel(5), InvalidInputError, "cancel(): message_id=5"),  # type: ignore[arg-type]
        (lambda: set_timezone(None), InvalidInputError, "set_timezone(): zone=None"),  # type: ignore[arg-type]
    ],
)
def test_bad_values_raise_our_error_naming_the_effect_and_argument(
    make: Any, error: type[Exception], named: str
) -> None:
    """A dialog's mistake is a ``DynapromptError`` (``InvalidInputError``), never pydantic's ``ValidationError``."""
    with pytest.raises(error) as raised:
        make()
    assert issubclass(error, InvalidInputError)
    assert not isinstance(raised.value, ValidationError)
    assert named in str(raised.value)
