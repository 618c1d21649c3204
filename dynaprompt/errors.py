"""Every error dynaprompt raises.

The tree::

    DynapromptError
    ├── NondeterminismError        replay met code that yields other effects than the log
    ├── CallError                  a call() failed; carries the original type name and message
    ├── TimeParseError             a natural-language time or duration was not understood
    ├── UnknownTimeZoneError       a time-zone name that is not an IANA zone
    ├── UnknownDialogError         a dialog name that is not registered
    ├── DialogLoadError            (dynaprompt.loading) a command-line target naming no single dialog
    ├── WebhookDeliveryError       (dynaprompt.http) the webhook did not acknowledge a message
    ├── InvalidInputError          user input the library refuses
    │   ├── NotTextError           a message whose text is not a str
    │   ├── MessageTooLargeError   a message over the runner's size limit
    │   ├── NotJSONError           dialog arguments or results that are not JSON-compatible
    │   ├── RecurrenceError        an ``every=`` phrase or cron expression not understood
    │   ├── ScheduleError          a schedule that cannot be (past ``at``, too frequent, ...)
    │   └── UnknownMessageIdError  (dynaprompt.http) a stream resumed after an id it does not know
    ├── ConversationError
    │   ├── UnknownConversationError
    │   ├── ConversationExistsError   start() of an id that has a live run
    │   └── ConversationEndedError    deliver() to a completed or failed conversation
    └── StoreError
        ├── ConflictError          another writer appended that sequence number first
        ├── CorruptEventError      a stored event that does not validate
        ├── StoreUnavailableError  the database cannot be reached
        └── MissingExtraError      an optional dependency is not installed
"""

from __future__ import annotations

__all__ = [
    "CallError",
    "ConflictError",
    "ConversationEndedError",
    "ConversationError",
    "ConversationExistsError",
    "CorruptEventError",
    "DynapromptError",
    "InvalidInputError",
    "MessageTooLargeError",
    "MissingExtraError",
    "NondeterminismError",
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
]


class DynapromptError(Exception):
    """Base of every error the library raises."""


class NondeterminismError(DynapromptError):
    """The dialog yielded an effect other than the one the log recorded.

    Raised by the replay engine; the runner parks the conversation as failed
    and appends nothing. ``deliver()`` raises it too.
    """

    def __init__(self, conversation_id: str, seq: int, recorded: str, yielded: str) -> None:
        self.conversation_id = conversation_id
        self.seq = seq
        self.recorded = recorded
        self.yielded = yielded
        super().__init__(
            f"conversation {conversation_id!r} diverged from its log at seq {seq}: "
            f"the log recorded {recorded}, the code yielded {yielded}"
        )


class CallError(DynapromptError):
    """A ``call()`` raised; raised inside the dialog at that ``yield``.

    ``type_name`` and ``message`` are those of the original exception, so the
    warm run and a replay raise the very same error.
    """

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        self.message = message
        super().__init__(f"{type_name}: {message}")


class TimeParseError(DynapromptError, ValueError):
    """A natural-language time or duration was not understood.

    Raised inside the dialog at the ``yield`` that carried it, so the dialog
    may catch it; raised directly by ``Runner`` methods that take times.
    """

    def __init__(self, text: str, expected: str = "a time") -> None:
        self.text = text
        super().__init__(f"could not understand {text!r} as {expected}")


class UnknownTimeZoneError(DynapromptError, ValueError):
    """A time-zone name that is not an IANA zone such as ``Europe/London``."""

    def __init__(self, zone: str) -> None:
        self.zone = zone
        super().__init__(f"unknown time zone {zone!r} (expected an IANA name such as 'Europe/London')")


class UnknownDialogError(DynapromptError, LookupError):
    """A dialog name that no ``@dialog`` registered (in this process)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no dialog named {name!r} is registered; import the module that defines it")


class InvalidInputError(DynapromptError, ValueError):
    """Input the library refuses; nothing is stored.

    An effect built with a value of the wrong kind (``send("hi", to=5)``, ``sleep([1])``) raises it in the
    dialog's own code, where the effect is built, naming the effect and the argument: the dialog may catch
    it; if it does not, its conversation fails with it, and only that conversation."""


class NotTextError(InvalidInputError, TypeError):
    """A message text that is not a ``str``."""

    def __init__(self, value: object) -> None:
        super().__init__(f"message text must be a str, not {type(value).__name__}")


class MessageTooLargeError(InvalidInputError):
    """A message longer than the runner's ``max_message_chars``."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} characters exceeds the limit of {limit}")


class NotJSONError(InvalidInputError, TypeError):
    """A value that must be JSON-compatible (dialog arguments, call results) is not."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what} must be JSON-compatible: {detail}")


class RecurrenceError(InvalidInputError):
    """An ``every=`` recurrence that is neither a known phrase nor a cron expression.

    Raised by ``Runner.schedule()``; the docs list the phrases understood.
    """

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        super().__init__(f"could not understand the recurrence {text!r}: {reason}")


class ScheduleError(InvalidInputError):
    """A schedule that cannot be made: ``at`` in the past, neither ``at`` nor ``every``,
    a recurrence more frequent than the runner's minimum. Raised by ``Runner.schedule()``."""


class ConversationError(DynapromptError):
    """Something is wrong with the conversation named."""

    def __init__(self, conversation_id: str, message: str) -> None:
        self.conversation_id = conversation_id
        super().__init__(message)


class UnknownConversationError(ConversationError, LookupError):
    """No conversation has this id."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(conversation_id, f"unknown conversation {conversation_id!r}")


class ConversationExistsError(ConversationError):
    """``start()`` of an id whose latest run has not ended."""

    def __init__(self, conversation_id: str, state: str) -> None:
        self.state = state
        super().__init__(
            conversation_id,
            f"conversation {conversation_id!r} exists and is {state}; it can be started again once it has ended",
        )


class ConversationEndedError(ConversationError):
    """``deliver()`` to a conversation whose latest run has completed or failed.

    Start a new run with ``runner.start()`` on the same id.
    """

    def __init__(self, conversation_id: str, state: str) -> None:
        self.state = state
        super().__init__(
            conversation_id, f"conversation {conversation_id!r} has ended ({state}); start it again to talk"
        )


class StoreError(DynapromptError):
    """A store could not do what was asked."""


class ConflictError(StoreError):
    """Another writer appended sequence number ``seq`` of this conversation first."""

    def __init__(self, conversation_id: str, seq: int) -> None:
        self.conversation_id = conversation_id
        self.seq = seq
        super().__init__(f"conversation {conversation_id!r}: seq {seq} was appended by another writer")


class CorruptEventError(StoreError):
    """A stored event does not validate against the event models."""

    def __init__(self, conversation_id: str, seq: int, detail: str) -> None:
        self.conversation_id = conversation_id
        self.seq = seq
        super().__init__(f"conversation {conversation_id!r}: event at seq {seq} is corrupt: {detail}")


class StoreUnavailableError(StoreError):
    """The database behind a store cannot be reached (the URL has credentials masked)."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        super().__init__(f"store {url} is unavailable: {detail}")


class MissingExtraError(StoreError, ImportError):
    """An optional dependency is missing; the message says which extra to install."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(f"{feature} needs an optional dependency: pip install 'dynaprompt[{extra}]'")
