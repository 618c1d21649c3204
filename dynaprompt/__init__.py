"""dynaprompt: durable chatbot dialogs written as generators.

::

    from dynaprompt import dialog, send, wait_for_reply

    @dialog
    async def hello():
        yield send("What's your name?")
        reply = yield wait_for_reply()
        yield send(f"Nice to meet you, {reply.text}!")
"""

from dynaprompt.channels.base import Channel, ListChannel
from dynaprompt.dialogs import Dialog, dialog
from dynaprompt.effects import (
    call,
    cancel,
    finish,
    now,
    send,
    set_timezone,
    sleep,
    sleep_until,
    wait_for_reply,
)
from dynaprompt.errors import (
    CallError,
    ConflictError,
    ConversationEndedError,
    ConversationError,
    ConversationExistsError,
    CorruptEventError,
    DynapromptError,
    InvalidInputError,
    MessageTooLargeError,
    MissingExtraError,
    NondeterminismError,
    NotJSONError,
    NotTextError,
    RecurrenceError,
    ScheduleError,
    StoreError,
    StoreUnavailableError,
    TimeParseError,
    UnknownConversationError,
    UnknownDialogError,
    UnknownTimeZoneError,
)
from dynaprompt.models import Message, Reply, Status, TranscriptEntry
from dynaprompt.runner import Runner
from dynaprompt.stores import Store, open_store

__version__ = "0.1.0"

__all__ = [
    "CallError",
    "Channel",
    "ConflictError",
    "ConversationEndedError",
    "ConversationError",
    "ConversationExistsError",
    "CorruptEventError",
    "Dialog",
    "DynapromptError",
    "InvalidInputError",
    "ListChannel",
    "Message",
    "MessageTooLargeError",
    "MissingExtraError",
    "NondeterminismError",
    "NotJSONError",
    "NotTextError",
    "RecurrenceError",
    "Reply",
    "Runner",
    "ScheduleError",
    "Status",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "TimeParseError",
    "TranscriptEntry",
    "UnknownConversationError",
    "UnknownDialogError",
    "UnknownTimeZoneError",
    "call",
    "cancel",
    "dialog",
    "finish",
    "now",
    "open_store",
    "send",
    "set_timezone",
    "sleep",
    "sleep_until",
    "wait_for_reply",
]
