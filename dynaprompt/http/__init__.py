"""dynaprompt over HTTP (``pip install 'dynaprompt[http]'``): an ASGI service, a resumable
stream of bot messages, and an outbound webhook channel.

::

    dynaprompt serve examples/dragons.py --store sqlite:///bot.db --port 8000

See :func:`create_app` and ``docs/http.md``.
"""

from dynaprompt.http.app import create_app, openapi_document
from dynaprompt.http.webhook import WebhookChannel, WebhookDeliveryError, sign, verify_signature

__all__ = ["WebhookChannel", "WebhookDeliveryError", "create_app", "openapi_document", "sign", "verify_signature"]
