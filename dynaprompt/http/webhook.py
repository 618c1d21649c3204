"""The outbound webhook channel: POST each bot message to a URL until it is acknowledged.

Each message is POSTed as JSON (an :class:`~dynaprompt.http.models.OutboundMessage`) with

* ``Idempotency-Key: <message id>``: the same on every re-delivery (``"<conversation_id>:<seq>"``),
  so the receiver can drop duplicates and make delivery exactly-once;
* ``X-Dynaprompt-Signature: sha256=<hex>`` when a secret is set: HMAC-SHA256 of the raw body
  with the secret (check it with :func:`verify_signature`, in constant time).

Any 2xx answer acknowledges the message. Anything else (another status, a refused
connection, a timeout) is retried in the same hand-off with exponential backoff; when
``attempts`` are used up, ``deliver`` raises :class:`WebhookDeliveryError`. The runner then
leaves the message (and the conversation's later ones, so order holds) queued in the log and
hands it over again on a later pass of its timer loop, after a restart too: a message is
only marked delivered once a receiver acknowledged it. While the receiver is failing, further
hand-offs fail fast for a cool-down that doubles up to ``max_cooldown`` seconds, so one dead
receiver does not hold the timer loop for every conversation.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import datetime, timedelta

import anyio
import httpx

from dynaprompt.clock import Clock, SystemClock
from dynaprompt.errors import DynapromptError
from dynaprompt.http.models import OutboundMessage
from dynaprompt.models import Message

__all__ = ["SIGNATURE_HEADER", "WebhookChannel", "WebhookDeliveryError", "sign", "verify_signature"]

SIGNATURE_HEADER = "X-Dynaprompt-Signature"
log = logging.getLogger("dynaprompt.http")


class WebhookDeliveryError(DynapromptError):
    """The webhook did not acknowledge a message; raised by :meth:`WebhookChannel.deliver`.

    The runner keeps the message queued and hands it over again later.
    """

    def __init__(self, url: str, message_id: str, detail: str) -> None:
        self.url = url
        self.message_id = message_id
        super().__init__(f"webhook {url} did not acknowledge message {message_id}: {detail}")


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``.

    >>> sign("s3cret", b'{"text":"hi"}')
    'sha256=033b6215e0418d45ead2c73e9d3059b3efba91da4d5f556dc6aa782294cff195'
    """
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """True when ``header`` is the signature of ``body`` under ``secret`` (constant-time comparison).

    >>> body = b'{"id":"c1:2"}'
    >>> verify_signature("k", body, sign("k", body)), verify_signature("k", body, sign("other", body))
    (True, False)
    """
    return header is not None and hmac.compare_digest(header.encode(), sign(secret, body).encode())


class WebhookChannel:
    """A channel that POSTs every message to ``url``; see the module docstring for the protocol.

    ::

        channel = WebhookChannel("https://chat.example/hook", secret="s3cret")
        async with Runner(store, channel) as runner:
            ...
        await channel.aclose()

    Options: ``attempts`` per hand-off (4), ``backoff`` before the first retry in seconds
    (0.1, doubling), ``timeout`` per request (5 s), ``max_cooldown`` (60 s), ``clock`` for the
    cool-down, ``client`` an ``httpx.AsyncClient`` to use (not closed by ``aclose``).
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        attempts: int = 4,
        backoff: float = 0.1,
        timeout: float = 5.0,
        max_cooldown: float = 60.0,
        clock: Clock | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.url = url
        self.secret = secret
        self.attempts = attempts
        self.backoff = backoff
        self.max_cooldown = max_cooldown
        self.clock: Clock = clock or SystemClock()
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._cooldown = 0.0
        self._closed_until: datetime | None = None

    async def deliver(self, message: Message) -> None:
        """POST ``message`` until a 2xx answers; ``WebhookDeliveryError`` when it never does."""
        if self._closed_until is not None and self.clock.now() < self._closed_until:
            raise WebhookDeliveryError(self.url, message.id, "the receiver is failing; cooling down before a retry")
        body = OutboundMessage.of(message).model_dump_json().encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": message.id}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        delay = self.backoff
        detail = ""
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                detail = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    self._cooldown, self._closed_until = 0.0, None
                    return
                detail = f"HTTP {response.status_code}"
            log.warning("webhook attempt %d for %s failed: %s", attempt, message.id, detail)
            if attempt < self.attempts:
                await anyio.sleep(delay)
                delay *= 2
        self._cooldown = min(self.max_cooldown, max(delay, self._cooldown * 2))
        self._closed_until = self.clock.now() + timedelta(seconds=self._cooldown)
        raise WebhookDeliveryError(self.url, message.id, f"{detail} after {self.attempts} attempts")

    async def aclose(self) -> None:
        """Close the HTTP client this channel created."""
        if self._own_client:
            await self._client.aclose()
