"""Reusable dialog parts: ask, check the answer, ask again.

Each block is a ``@dialog`` with a stable name, so any dialog can call it as a
sub-dialog and get its result from the ``yield``::

    from blocks import multichoice, prompt, yes_no

    name = yield prompt("What's your name?")
    if (yield yes_no("Shall we talk?", "Just yes or no, please.")):
        topic = yield multichoice("About what?", "Pick a number, please.", ["dragons", "the weather"])

A sub-dialog is recorded in the caller's log (its sends and waits replay like the
caller's own), so a block is written once and reused everywhere, durable for free.
Every block takes an optional ``nudge``: when the user stays quiet for ``quiet``
(ten minutes by default), the block sends the nudge once and then waits as long as
it takes.

Names are explicit (``blocks.prompt``, ...) because the log records them: keep them
stable when moving or renaming the functions.
"""

from __future__ import annotations

from dynaprompt import dialog, finish, send, wait_for_reply

__all__ = ["answer", "multichoice", "prompt", "yes_no"]

QUIET = "10 minutes"
_YES = {"y", "yes"}
_NO = {"n", "no"}


@dialog(name="blocks.answer")
async def answer(nudge: str | None = None, quiet: str = QUIET):
    """Wait for the user's next message and return its text; nudge them once if they go quiet."""
    reply = yield wait_for_reply(timeout=quiet if nudge else None)
    if reply is None:
        yield send(nudge)
        reply = yield wait_for_reply()
    yield finish(reply.text)


@dialog(name="blocks.prompt")
async def prompt(text: str, nudge: str | None = None):
    """Send ``text``, wait for the answer, return its text."""
    yield send(text)
    reply = yield answer(nudge)
    yield finish(reply)


@dialog(name="blocks.yes_no")
async def yes_no(question: str, retry: str = "Please answer yes or no.", nudge: str | None = None):
    """Ask ``question`` until the answer is y/yes/n/no (any case); return True for yes, False for no.

    Any other answer gets ``retry`` and another wait.
    """
    yield send(question)
    while True:
        text = (yield answer(nudge)).strip().lower()
        if text in _YES:
            yield finish(True)
        if text in _NO:
            yield finish(False)
        yield send(retry)


@dialog(name="blocks.multichoice")
async def multichoice(question: str, retry: str, choices: list[str], nudge: str | None = None):
    """Ask ``question`` with ``choices`` as a numbered list; return the chosen one.

    The user may answer with the number or the choice itself (any case); anything
    else gets ``retry`` and another wait.
    """
    numbered = "\n".join(f"{number}. {choice}" for number, choice in enumerate(choices, start=1))
    yield send(f"{question}\n{numbered}")
    while True:
        text = (yield answer(nudge)).strip().lower().rstrip(".")
        for number, choice in enumerate(choices, start=1):
            if text in (str(number), choice.lower()):
                yield finish(choice)
        yield send(retry)
