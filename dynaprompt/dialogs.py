"""``@dialog``: turning a generator function into a named, resumable dialog."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, overload

from dynaprompt.effects import (
    Call,
    Cancel,
    Effect,
    Finish,
    Now,
    Send,
    SetTimezone,
    Sleep,
    SleepUntil,
    SubDialog,
    WaitForReply,
)
from dynaprompt.errors import DynapromptError, UnknownDialogError

__all__ = ["Dialog", "Done", "Frame", "dialog", "lookup", "registered"]

DialogFunction = Callable[..., AsyncGenerator[Any, Any] | Generator[Any, Any, Any]]

_registry: dict[str, Dialog] = {}
_PLAIN_EFFECTS = frozenset({Send, WaitForReply, SleepUntil, Sleep, Now, Call, SubDialog, Cancel, SetTimezone})


class Dialog:
    """A registered dialog (what ``@dialog`` returns).

    Calling it inside another dialog yields a sub-dialog::

        answer = yield yes_no("Like dragons?")
    """

    def __init__(self, fn: DialogFunction, name: str, version: str | None) -> None:
        if not (inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)):
            raise DynapromptError(
                f"@dialog needs a generator function (async def with yield, or def with yield); {name!r} is not one"
            )
        self.fn = fn
        self.name = name
        self.version = version
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = fn.__module__

    def __call__(self, *args: Any, **kwargs: Any) -> SubDialog:
        return SubDialog(dialog=self, arguments=args, keywords=kwargs)

    def __repr__(self) -> str:
        return f"<dialog {self.name}>"

    def open(self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> Frame:
        """Start a fresh generator of this dialog."""
        return Frame(self, self.fn(*args, **kwargs))


@overload
def dialog(fn: DialogFunction, /) -> Dialog: ...
@overload
def dialog(*, name: str | None = None, version: str | None = None) -> Callable[[DialogFunction], Dialog]: ...
def dialog(
    fn: DialogFunction | None = None, /, *, name: str | None = None, version: str | None = None
) -> Dialog | Callable[[DialogFunction], Dialog]:
    """Register a generator function as a dialog, bare or with options::

        @dialog
        async def greet(name: str):
            yield send(f"Hi {name}!")

        @dialog(name="onboarding", version="2")
        def onboarding():
            yield send("Welcome!")
            return "done"

    The name defaults to ``module:qualname``; it is what the log records, so
    keep it stable (pass ``name=`` before moving the function). Registering a
    name again replaces the older definition. ``version`` is recorded in the
    ``started`` event of every run (``dynaprompt show ID --events``); it names
    your change, it does not keep old code around.
    """

    def register(function: DialogFunction) -> Dialog:
        dialog_name = name or f"{function.__module__}:{function.__qualname__}"
        registered_dialog = Dialog(function, dialog_name, version)
        _registry[dialog_name] = registered_dialog
        return registered_dialog

    return register(fn) if fn is not None else register


def lookup(name: str) -> Dialog:
    """The dialog registered as ``name``."""
    try:
        return _registry[name]
    except KeyError:
        raise UnknownDialogError(name) from None


def registered() -> dict[str, Dialog]:
    """A copy of the registry: name to dialog."""
    return dict(_registry)


class Done(Exception):
    """The frame's generator has ended with ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Frame:
    """One running generator, async or plain, behind one interface.

    A plain generator is also stepped synchronously (``step``), so replaying a long log of one costs no
    coroutine per effect; an async one only through ``send``/``throw``.
    """

    __slots__ = ("_agenerator", "_generator", "dialog", "is_async")

    def __init__(self, owner: Dialog, generator: AsyncGenerator[Any, Any] | Generator[Any, Any, Any]) -> None:
        self.dialog = owner
        self.is_async = inspect.isasyncgen(generator)
        self._agenerator: AsyncGenerator[Any, Any] | None = generator if self.is_async else None  # type: ignore[assignment]
        self._generator: Generator[Any, Any, Any] | None = None if self.is_async else generator  # type: ignore[assignment]

    async def send(self, value: Any) -> Effect:
        if self._generator is not None:
            return self.step(value, None)
        return self._check(await self._astep(value, None))

    async def throw(self, exc: BaseException) -> Effect:
        if self._generator is not None:
            return self.step(None, exc)
        return self._check(await self._astep(None, exc))

    def step(self, value: Any, exc: BaseException | None) -> Effect:
        """Send ``value`` (or throw ``exc``) into a plain generator; the effect it yields, or ``Done``."""
        generator = self._generator
        assert generator is not None, "step() needs a plain generator"
        try:
            yielded = generator.throw(exc) if exc is not None else generator.send(value)
        except StopIteration as stop:
            raise Done(stop.value) from None
        return self._check(yielded)

    async def _astep(self, value: Any, exc: BaseException | None) -> Any:
        generator = self._agenerator
        assert generator is not None
        try:
            return await (generator.athrow(exc) if exc is not None else generator.asend(value))
        except StopAsyncIteration:
            raise Done(None) from None

    def _check(self, yielded: Any) -> Effect:
        if type(yielded) in _PLAIN_EFFECTS:  # the usual case, without isinstance() through ABCMeta
            return yielded  # type: ignore[no-any-return]
        if isinstance(yielded, Effect):
            if isinstance(yielded, Finish):
                raise Done(yielded.value)
            return yielded
        raise DynapromptError(
            f"dialog {self.dialog.name!r} yielded {yielded!r}; a dialog may only yield effects "
            "(send, wait_for_reply, sleep_until, sleep, now, call, finish, cancel, or a sub-dialog)"
        )

    async def close(self) -> None:
        try:
            if self._agenerator is not None:
                await self._agenerator.aclose()
            elif self._generator is not None:
                self._generator.close()
        except Exception:
            pass
