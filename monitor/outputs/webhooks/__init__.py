"""Webhook events: a durable outbox in SQLite, rendered per format, sent at least once.

Three modules, one job each (``docs/webhooks.md``):

* ``outbox`` -- :func:`enqueue` in the caller's transaction, the backlog, the purge,
  and every SQL statement on ``events`` and ``webhook_deliveries``;
* ``render`` -- the request body per format (``json``, ``slack``, ``telegram``),
  the readable summary, the headers and the HMAC signature;
* ``send`` -- :class:`WebhookSender`: the HTTP POST, the outcome of each attempt,
  retries with :mod:`monitor.outputs.retry`'s back-off and ``Retry-After``.

The names below are the package's API (``from monitor.outputs import webhooks``);
they are defined in those modules.
"""

from monitor.outputs.webhooks.outbox import (
    DELIVERED,
    PENDING,
    UNDELIVERABLE,
    Backlog,
    EventError,
    WebhookError,
    backlog,
    describe,
    enqueue,
    event_body,
    matches,
    purge,
    webhook_key,
)
from monitor.outputs.webhooks.render import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TELEGRAM_MAX_CHARS,
    USER_AGENT,
    render,
    request_headers,
    signature,
    slack_escape,
    summary,
)
from monitor.outputs.webhooks.send import (
    OUTCOME_DELIVERED,
    OUTCOME_FAILED,
    OUTCOME_REJECTED,
    OUTCOME_UNDELIVERABLE,
    DeliveryStats,
    HttpPost,
    HttpResponse,
    TransportError,
    WebhookSender,
    urllib_post,
)

__all__ = [
    "DELIVERED",
    "EVENT_ID_HEADER",
    "OUTCOME_DELIVERED",
    "OUTCOME_FAILED",
    "OUTCOME_REJECTED",
    "OUTCOME_UNDELIVERABLE",
    "PENDING",
    "SIGNATURE_HEADER",
    "TELEGRAM_MAX_CHARS",
    "UNDELIVERABLE",
    "USER_AGENT",
    "Backlog",
    "DeliveryStats",
    "EventError",
    "HttpPost",
    "HttpResponse",
    "TransportError",
    "WebhookError",
    "WebhookSender",
    "backlog",
    "describe",
    "enqueue",
    "event_body",
    "matches",
    "purge",
    "render",
    "request_headers",
    "signature",
    "slack_escape",
    "summary",
    "urllib_post",
    "webhook_key",
]
