"""Stores: where event logs live. ``open_store(url)`` picks one by URL scheme."""

from __future__ import annotations

from typing import Any

from dynaprompt.errors import StoreUnavailableError
from dynaprompt.stores.base import Claim, ConversationRow, RowUpdate, Store

__all__ = ["Claim", "ConversationRow", "RowUpdate", "Store", "open_store"]


def mask(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for error messages and logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and sep:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


async def open_store(url: str, **options: Any) -> Store:
    """Open the store at ``url``:

    * ``"memory://"``: a new, empty in-memory store (tests);
    * ``"sqlite:///path/to.db"`` (relative) or ``"sqlite:////abs/path.db"``: embedded, the default;
    * ``"mongodb://host:port/dbname"``: MongoDB (``pip install 'dynaprompt[mongo]'``).

    >>> import anyio
    >>> store = anyio.run(open_store, "memory://")
    >>> store.url
    'memory://'
    """
    if url.startswith("memory://"):
        from dynaprompt.stores.memory import MemoryStore

        return MemoryStore(url)
    if url.startswith("sqlite://"):
        from dynaprompt.stores.sqlite import SQLiteStore

        return SQLiteStore(url)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        try:
            from dynaprompt.stores.mongo import MongoStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            from dynaprompt.errors import MissingExtraError

            raise MissingExtraError("the MongoDB store", "mongo") from exc
        store: Store = await MongoStore.open(url, **options)
        return store
    raise StoreUnavailableError(mask(url), "unknown scheme; use memory://, sqlite:///path or mongodb://host/db")
