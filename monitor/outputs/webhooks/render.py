"""What a webhook receives: the request body per format, and its headers and signature.

Pure: from a stored event body (JSON text) and a webhook's configuration to
bytes and headers.  ``json`` sends the stored body byte for byte; ``slack`` and
``telegram`` send a readable :func:`summary`, escaped for the receiver (Slack's
three control characters; Telegram's HTML, cut to its message limit).  A
webhook with a secret gets an HMAC-SHA256 :func:`signature` of the raw body.
See ``docs/webhooks.md`` for the receiver's side.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
from collections.abc import Mapping
from typing import Any

from monitor.config import WebhookConfig
from monitor.outputs import chat_ru as ru
from monitor.store.audit import canonical_json

EVENT_ID_HEADER = "X-Energy-Monitor-Event-Id"
SIGNATURE_HEADER = "X-Energy-Monitor-Signature"
USER_AGENT = "energy-monitor-webhooks/1"

TELEGRAM_MAX_CHARS = 4096
SEVERITY_EMOJI = {"critical": "\U0001f6a8", "warning": "\u26a0\ufe0f", "info": "\u2139\ufe0f"}
RESOLVED_EMOJI = "\u2705"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _emoji(body: Mapping[str, Any]) -> str:
    kind = str(body.get("kind", "event"))
    severity = str(body.get("severity", "info"))
    return RESOLVED_EMOJI if kind.endswith((".resolved", ".recovered", ".confirmed")) else (
        SEVERITY_EMOJI.get(severity, SEVERITY_EMOJI["info"])
    )


def summary(body: Mapping[str, Any], language: str = "en") -> tuple[str, str]:
    """A readable (headline, detail) pair for chat formats, in English or (``ru``)
    Russian (:mod:`monitor.outputs.chat_ru`)."""
    if language == "ru":
        return ru.summary(body, _emoji(body), _number)
    kind = str(body.get("kind", "event"))
    severity = str(body.get("severity", "info"))
    emoji = _emoji(body)
    where = " · ".join(
        str(body[k]) for k in ("site", "rule", "scope") if body.get(k) not in (None, "")
    )
    headline = f"{emoji} {severity.upper()} {kind}" + (f" · {where}" if where else "")
    lines = [str(body["message"])] if body.get("message") else []
    unit = f" {body['unit']}" if body.get("unit") else ""
    if body.get("value") is not None and body.get("limit") is not None:
        figures = f"value {_number(body['value'])} / limit {_number(body['limit'])}{unit}"
        if body.get("projected") is not None:
            figures += f", projected {_number(body['projected'])}{unit}"
        lines.append(figures)
    lines.append(f"at {body.get('at', '?')} · event {body.get('event_id', '?')}")
    return headline, "\n".join(lines)


def slack_escape(text: str) -> str:
    """Slack's three control characters (its docs: escape &, <, > in ``text``)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render(webhook: WebhookConfig, body_text: str) -> bytes:
    """The request body for ``webhook``.  ``json``: the stored event body, byte for byte."""
    if webhook.format == "json":
        return body_text.encode()
    body = json.loads(body_text)
    headline, detail = summary(body, webhook.language)
    if webhook.format == "slack":
        payload: dict[str, Any] = {"text": slack_escape(f"{headline}\n{detail}")}
    else:  # telegram: Bot API sendMessage, HTML with every dynamic part escaped
        head = f"<b>{html.escape(headline[:200], quote=False)}</b>\n"
        text = head + html.escape(detail, quote=False)
        keep = len(detail)
        while len(text) > TELEGRAM_MAX_CHARS:  # escaping can only lengthen: shrink until it fits
            keep -= len(text) - TELEGRAM_MAX_CHARS + 1
            text = head + html.escape(detail[:keep], quote=False) + "\u2026"
        payload = {
            "chat_id": webhook.chat_id,
            "text": text,
            "parse_mode": "HTML",
            "disable_web_page_preview": True,
        }
    return canonical_json(payload).encode()


def signature(secret: str, raw_body: bytes) -> str:
    """The ``X-Energy-Monitor-Signature`` value: ``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


def request_headers(webhook: WebhookConfig, event_id: str, raw_body: bytes) -> dict[str, str]:
    """The request's headers: content type, user agent, event id and, with a secret,
    the signature of ``raw_body``."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_ID_HEADER: event_id,
    }
    if webhook.secret is not None and webhook.secret.get_secret_value():
        headers[SIGNATURE_HEADER] = signature(webhook.secret.get_secret_value(), raw_body)
    return headers
