"""``dynaprompt serve APP``: serve dialogs over HTTP (``pip install 'dynaprompt[http]'``).

``APP`` names the dialogs to expose, comma-separated, each a target as ``chat`` takes it
(``path.py``, ``path.py:name``, ``module:name``); clients start them by their registered
dialog name. The timer loop runs inside the service. When it is up, one line on stdout says
where (``dynaprompt: serving dragons on http://127.0.0.1:8000``), which makes ``--port 0``
(any free port) usable by scripts.

Secrets can come from the environment instead of the command line, where ``ps`` would show
them: ``DYNAPROMPT_TOKEN`` and ``DYNAPROMPT_WEBHOOK_SECRET``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import anyio

from dynaprompt.errors import MissingExtraError
from dynaprompt.loading import load_dialog
from dynaprompt.stores import mask, open_store

__all__ = ["add_parser", "run"]

DEFAULT_STORE = "sqlite:///.dynaprompt/dynaprompt.db"


def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its own signal handling: the command handles SIGINT and SIGTERM, so it
        can close the store and exit 0 (uvicorn would re-raise the signal and kill the process instead)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve dialogs over HTTP",
        description="Serve dialogs over HTTP: start conversations, deliver messages, stream the bot's messages "
        "(server-sent events), POST them to a webhook. See docs/http.md.",
    )
    parser.add_argument("app", help="dialogs to serve, comma-separated: path.py, path.py:name or module:name")
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default: {DEFAULT_STORE})")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument(
        "--token", default=os.environ.get("DYNAPROMPT_TOKEN"), help="require 'Authorization: Bearer TOKEN' "
        "on every request (default: $DYNAPROMPT_TOKEN; no auth when unset)"
    )  # fmt: skip
    parser.add_argument("--webhook", default=None, help="POST every bot message to this URL until acknowledged")
    parser.add_argument(
        "--webhook-secret", default=os.environ.get("DYNAPROMPT_WEBHOOK_SECRET"),
        help="sign webhook bodies with HMAC-SHA256 (header X-Dynaprompt-Signature; default: "
        "$DYNAPROMPT_WEBHOOK_SECRET)",
    )  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, default=256 * 1024, help="largest request body (256 KiB)")
    parser.add_argument("--tz", default=None, help="IANA time zone of new conversations (default: UTC)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    """The ``serve`` command: load the dialogs, open the store, run uvicorn until SIGINT/SIGTERM."""
    try:
        import uvicorn

        from dynaprompt.http.app import create_app
    except ImportError as exc:
        raise MissingExtraError("dynaprompt serve", "http") from exc
    dialogs = [load_dialog(target.strip()) for target in args.app.split(",") if target.strip()]
    store = await open_store(args.store)
    try:
        app = create_app(
            dialogs, store=store, token=args.token or None, webhook_url=args.webhook,
            webhook_secret=args.webhook_secret, max_body_bytes=args.max_body_bytes, tz=args.tz,
        )  # fmt: skip
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.log_level in ("debug", "info"),
            timeout_graceful_shutdown=3,  # open streams would otherwise hold a graceful shutdown forever
        )
        server = _server_class()(config)
        async with anyio.create_task_group() as group:

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        server.should_exit = True  # graceful: finish requests, run the lifespan's shutdown
                        return

            async def announce() -> None:
                while not server.started:
                    if server.should_exit:
                        return
                    await anyio.sleep(0.02)
                port = server.servers[0].sockets[0].getsockname()[1]
                names = ", ".join(chosen.name for chosen in dialogs)
                print(
                    f"dynaprompt: serving {names} on http://{args.host}:{port} (store {mask(args.store)})", flush=True
                )

            group.start_soon(announce)
            group.start_soon(stop_on_signal)
            await server.serve()
            group.cancel_scope.cancel()
        if not server.started:
            print("dynaprompt: the service did not start (see the log above)", file=sys.stderr)
            return 1
        return 0
    finally:
        await store.close()
