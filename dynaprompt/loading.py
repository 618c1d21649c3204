"""Finding a dialog from a command-line target: ``path.py``, ``path.py:name`` or ``module:name``.

The commands of ``dynaprompt`` take a target naming a dialog and use
:func:`load_dialog` to import it:

* ``examples/guessbot.py`` or ``pkg.bots`` (no ``:name``): the module's
  ``main`` attribute if it is a dialog, else the only dialog *defined* in that
  module (dialogs it imports do not count); several candidates are an error
  that lists them, so you can pick one with ``:name``;
* ``examples/guessbot.py:yes_no`` or ``pkg.bots:yes_no``: that attribute,
  which may be dotted (``pkg.bots:Bots.greet``) and must be a dialog.

A target is a file path when the part before ``:`` ends in ``.py`` or holds a
path separator; otherwise it is an importable module name. A file is imported
the way ``python path.py`` would see it: its folder goes first on
``sys.path`` (so it can import its neighbours) and it is registered in
``sys.modules`` under its file stem (``guessbot``), so dialogs without an
explicit ``name=`` get the stable default name ``guessbot:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from dynaprompt.dialogs import Dialog
from dynaprompt.errors import DynapromptError

__all__ = ["DialogLoadError", "load_dialog", "load_module", "split_target"]


class DialogLoadError(DynapromptError, ImportError):
    """A command-line target that does not lead to exactly one dialog; the message says why."""


def split_target(target: str) -> tuple[str, str | None]:
    """Split ``target`` into the module part and the attribute after ``:`` (or ``None``).

    >>> split_target("examples/guessbot.py:yes_no")
    ('examples/guessbot.py', 'yes_no')
    >>> split_target("examples/guessbot.py")
    ('examples/guessbot.py', None)
    """
    head, sep, tail = target.rpartition(":")
    # "C:\\bots\\x.py" has a colon that is not a separator: the tail must read as a dotted name.
    if sep and head and tail and all(part.isidentifier() for part in tail.split(".")):
        return head, tail
    return target, None


def _is_path(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def load_module(module_part: str) -> ModuleType:
    """Import a file path (``bots/x.py``) or a module name (``pkg.bots``); errors become ``DialogLoadError``."""
    if not _is_path(module_part):
        try:
            return importlib.import_module(module_part)
        except ImportError as exc:
            raise DialogLoadError(f"cannot import module {module_part!r}: {exc}") from exc
    path = Path(module_part).resolve()
    if not path.is_file():
        raise DialogLoadError(f"no such file: {module_part}")
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None:
        existing_file = getattr(existing, "__file__", None)
        if existing_file is not None and Path(existing_file).resolve() == path:
            return existing
        raise DialogLoadError(
            f"cannot import {module_part} as module {name!r}: another module of that name is already imported "
            f"({existing_file or 'built in'}); rename the file"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for files Python cannot load at all
        raise DialogLoadError(f"cannot import {module_part}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise DialogLoadError(f"importing {module_part} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _defined_dialogs(module: ModuleType) -> dict[str, Dialog]:
    """The module's top-level dialogs that were defined in it (not imported), by attribute name."""
    return {
        attribute: value
        for attribute, value in vars(module).items()
        if isinstance(value, Dialog) and value.__module__ == module.__name__
    }


def load_dialog(target: str) -> Dialog:
    """The dialog that ``target`` names (see the module docstring for the rules).

    >>> load_dialog("dynaprompt.loading:load_dialog")
    Traceback (most recent call last):
      ...
    dynaprompt.loading.DialogLoadError: dynaprompt.loading:load_dialog is a function, not a @dialog
    """
    module_part, attribute = split_target(target)
    module = load_module(module_part)
    if attribute is not None:
        value: object = module
        for part in attribute.split("."):
            try:
                value = getattr(value, part)
            except AttributeError:
                raise DialogLoadError(f"{module_part} has no attribute {attribute!r}") from None
        if not isinstance(value, Dialog):
            raise DialogLoadError(f"{target} is a {type(value).__name__}, not a @dialog")
        return value
    main = getattr(module, "main", None)
    if isinstance(main, Dialog):
        return main
    candidates = _defined_dialogs(module)
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates:
        raise DialogLoadError(f"{module_part} defines no @dialog")
    names = ", ".join(f"{module_part}:{attribute}" for attribute in sorted(candidates))
    raise DialogLoadError(f"{module_part} defines several dialogs and none is called main; pick one: {names}")
