"""The public surface: one curated namespace that never drifts unnoticed.

When a name is added to or removed from ``dynaprompt.__all__`` on purpose,
update ``EXPECTED`` here in the same commit.
"""

from __future__ import annotations

import inspect

import dynaprompt
import dynaprompt.errors
import dynaprompt.testing
from dynaprompt.clock import VirtualClock as ClockModuleVirtualClock

# The names DESIGN.md's "Public API" table fixes.
DESIGN_NAMES = {
    "dialog",
    "send",
    "wait_for_reply",
    "sleep_until",
    "sleep",
    "now",
    "call",
    "finish",
    "cancel",
    "Runner",
    "open_store",
    "DynapromptError",
    "NondeterminismError",
    "CallError",
}

EXPECTED = DESIGN_NAMES | {
    # effects beyond the table
    "set_timezone",
    # models and protocols that cross the API
    "Channel",
    "Dialog",
    "ListChannel",
    "Message",
    "Reply",
    "Status",
    "Store",
    "TranscriptEntry",
    # the rest of the error tree
    "ConflictError",
    "ConversationEndedError",
    "ConversationError",
    "ConversationExistsError",
    "CorruptEventError",
    "InvalidInputError",
    "MessageTooLargeError",
    "MissingExtraError",
    "NotJSONError",
    "NotTextError",
    "RecurrenceError",
    "ScheduleError",
    "StoreError",
    "StoreUnavailableError",
    "TimeParseError",
    "UnknownConversationError",
    "UnknownDialogError",
    "UnknownTimeZoneError",
}


def test_all_is_exactly_the_expected_public_names() -> None:
    assert len(dynaprompt.__all__) == len(set(dynaprompt.__all__)), "a name is listed twice"
    assert set(dynaprompt.__all__) - EXPECTED == set(), "new public names: add them to EXPECTED on purpose"
    assert EXPECTED - set(dynaprompt.__all__) == set(), "public names went missing"


def test_every_design_name_is_importable_from_the_package() -> None:
    namespace: dict[str, object] = {}
    exec(f"from dynaprompt import {', '.join(sorted(DESIGN_NAMES))}", namespace)
    for name in DESIGN_NAMES:
        assert namespace[name] is getattr(dynaprompt, name)


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in dynaprompt.__all__:
        value = getattr(dynaprompt, name)
        assert inspect.getdoc(value), f"dynaprompt.{name} has no docstring"


def test_every_error_class_is_public_and_a_dynaprompt_error() -> None:
    for name in dynaprompt.errors.__all__:
        error_type = getattr(dynaprompt.errors, name)
        assert issubclass(error_type, dynaprompt.DynapromptError), name
        assert getattr(dynaprompt, name, None) is error_type, f"{name} is not exported from dynaprompt"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from dynaprompt import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(dynaprompt.__all__)


def test_testing_exports_the_virtual_clock() -> None:
    assert "VirtualClock" in dynaprompt.testing.__all__
    assert dynaprompt.testing.VirtualClock is ClockModuleVirtualClock
    for name in dynaprompt.testing.__all__:
        assert getattr(dynaprompt.testing, name) is not None
