"""A terminal client for ``dynaprompt serve``: type messages, see the bot's messages as they stream in.

Start the service, then the client::

    dynaprompt serve examples/dragons.py --store sqlite:///dragons.db
    python examples/http_client.py dragons --conversation me

Each line read from stdin is POSTed to ``/conversations/{id}/messages``; the bot's messages
are printed from ``/conversations/{id}/stream`` (server-sent events) as they arrive, timers'
messages included. If the stream drops, the client reconnects with ``Last-Event-ID`` and the
service replays what it missed. The client exits when the conversation ends. Run it again with
the same ``--conversation`` to pick up a live conversation where it stands.

Needs only httpx (``pip install 'dynaprompt[http]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import anyio
import httpx


async def stream_messages(client: httpx.AsyncClient, conversation_id: str, done: anyio.Event) -> None:
    """Print every bot message of the conversation, reconnecting after a dropped stream, until it ends."""
    last_id: str | None = None
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with client.stream(
                "GET", f"/conversations/{conversation_id}/stream", headers=headers, timeout=None
            ) as response:
                response.raise_for_status()
                fields: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line:
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
                        continue
                    if fields.get("event") == "message":
                        message = json.loads(fields["data"])
                        last_id = fields.get("id", last_id)
                        print(f"bot> {message['text']}", flush=True)
                    elif fields.get("event") == "end":
                        status = json.loads(fields["data"])
                        print(f"-- conversation {status['state']}", flush=True)
                        done.set()
                        return
                    fields = {}
        except httpx.HTTPStatusError:
            raise
        except httpx.HTTPError as exc:
            print(f"-- stream dropped ({type(exc).__name__}); reconnecting", file=sys.stderr, flush=True)
            await anyio.sleep(1)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dialog", help="the dialog to start (a name the service serves)")
    parser.add_argument("--conversation", default="http-client", help="conversation id (default: http-client)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: http://127.0.0.1:8000)")
    parser.add_argument(
        "--token", default=os.environ.get("DYNAPROMPT_TOKEN"), help="bearer token, if the service has one"
    )
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=30) as client:
        started = await client.post(
            "/conversations", json={"dialog": args.dialog, "conversation_id": args.conversation}
        )
        if started.status_code == 409 and started.json()["error"]["type"] == "ConversationExistsError":
            print(f"-- continuing conversation {args.conversation}", flush=True)
        elif started.status_code != 201:
            print(f"-- {started.json()['error']['message']}", file=sys.stderr)
            return 1
        done = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(stream_messages, client, args.conversation, done)

            async def type_lines() -> None:
                while True:
                    line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                    if not line:  # end of input: let the stream show what is still coming, then stop
                        with anyio.move_on_after(5):
                            await done.wait()
                        break
                    if line.strip():
                        answer = await client.post(
                            f"/conversations/{args.conversation}/messages", json={"text": line.rstrip("\n")}
                        )
                        if answer.status_code != 200:
                            print(f"-- {answer.json()['error']['message']}", file=sys.stderr, flush=True)
                group.cancel_scope.cancel()

            async def stop_when_done() -> None:
                await done.wait()
                group.cancel_scope.cancel()

            group.start_soon(type_lines)
            group.start_soon(stop_when_done)
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
