"""How a notice goes out: a JSON webhook signed with HMAC-SHA256, a Slack-compatible incoming
webhook, or an e-mail through Django's mail settings. Each send says whether it got through
(`Sent`); it never raises for what the other end did.

A webhook's secret is read from the environment variable the rule names, on the worker, at
send time: it is never stored, shown or logged. The body is signed as sent:
`X-PCR-Signature: sha256=<hex HMAC-SHA256 of the body bytes>`, so a receiver recomputes it
over the raw body with the shared secret and compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail

from testruns.catalog import provider_rules
from testruns.models import NotificationRule
from testruns.notify import messages

SIGNATURE_HEADER = "X-PCR-Signature"
# What an error message keeps of a receiver's answer.
ANSWER_CHARS = 300


@dataclass(frozen=True)
class Sent:
    ok: bool
    status_code: int | None = None
    error: str = ""


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body_bytes(payload: dict) -> bytes:
    # Sorted keys: the payload comes back from jsonb in its own order, and a retry must send
    # the same bytes.
    return json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def post_json(url: str, body: bytes, headers: dict[str, str]) -> Sent:
    """POST `body` to `url` (headers as written: some receivers match them by exact name);
    a 2xx answer is a success. Redirects are not followed: a redirect could lead a signed
    notice, or the worker, anywhere, and the rule names the URL."""
    try:
        provider_rules.check_base_url(url)  # again at send time: DNS may have changed
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError("the URL is not an http(s) URL")
    except (ValidationError, ValueError) as exc:
        return Sent(False, error=getattr(exc, "messages", [str(exc)])[0])
    connection_class = HTTPSConnection if parts.scheme == "https" else HTTPConnection
    connection = connection_class(
        parts.hostname, parts.port, timeout=settings.NOTIFY_TIMEOUT_SECONDS
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "prompt-card-runner",
                **headers,
            },
        )
        response = connection.getresponse()
        answer = response.read(ANSWER_CHARS).decode(errors="replace").strip()
    except (OSError, HTTPException) as exc:
        return Sent(False, error=f"could not reach the receiver: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    if 200 <= response.status < 300:
        return Sent(True, response.status)
    return Sent(
        False, response.status, f"HTTP {response.status} {response.reason}: {answer}".strip(": ")
    )


def send_webhook(rule: NotificationRule, payload: dict) -> Sent:
    secret = os.environ.get(rule.secret_env, "") if rule.secret_env else ""
    try:
        provider_rules.check_key_env_name(rule.secret_env)
    except ValidationError as exc:
        return Sent(False, error=exc.messages[0])
    if not secret:
        return Sent(
            False,
            error=f"the secret variable {rule.secret_env} is not set on this worker; "
            "the notice is not sent unsigned",
        )
    body = body_bytes(payload)
    headers = {SIGNATURE_HEADER: sign(secret, body), "X-PCR-Delivery": str(payload["delivery"])}
    return post_json(rule.url, body, headers)


def send_slack(rule: NotificationRule, payload: dict) -> Sent:
    """To the rule's URL, or, when it names one, to the URL in an environment variable: a
    Slack incoming-webhook URL is itself a secret (whoever has it may post), so it is better
    kept out of the database, as provider keys are."""
    url = rule.url
    if rule.secret_env:
        try:
            provider_rules.check_key_env_name(rule.secret_env)
        except ValidationError as exc:
            return Sent(False, error=exc.messages[0])
        url = os.environ.get(rule.secret_env, "")
        if not url:
            return Sent(False, error=f"the variable {rule.secret_env} is not set on this worker")
    sent = post_json(url, body_bytes(messages.slack_body(payload)), {})
    if rule.secret_env and sent.error:  # never repeat a secret URL in the delivery log
        sent = Sent(sent.ok, sent.status_code, sent.error.replace(url, f"${rule.secret_env}"))
    return sent


def send_email(rule: NotificationRule, payload: dict) -> Sent:
    subject, text = messages.email_message(payload)
    try:
        send_mail(subject, text, settings.DEFAULT_FROM_EMAIL, rule.recipient_list())
    except Exception as exc:  # SMTP refusals, timeouts, a bad backend setting
        return Sent(False, error=f"the mail could not be sent: {type(exc).__name__}: {exc}")
    return Sent(True)


SENDERS = {
    NotificationRule.Channel.WEBHOOK: send_webhook,
    NotificationRule.Channel.SLACK: send_slack,
    NotificationRule.Channel.EMAIL: send_email,
}


def send(rule: NotificationRule, payload: dict) -> Sent:
    sender = SENDERS.get(rule.channel)
    if sender is None:
        return Sent(False, error=f"unknown channel {rule.channel!r}")
    return sender(rule, payload)
