"""Idempotency-Key for POST requests that queue runs: a client that retries after a lost
answer gets the runs its first request queued instead of queueing them twice.

Kept in Redis (SET NX with a TTL, IDEMPOTENCY_TTL_SECONDS): the key is per user, and it holds
a fingerprint of the request and, once the request succeeded, the ids of the runs it queued.
- The first request claims the key ("pending"), queues, then records the run ids.
- A retry with the same body gets those runs again; with another body, a conflict.
- A retry while the first is still being handled gets a conflict too (try again shortly).
- A request that failed (bad input, a full queue) releases the key, so a corrected retry
  with the same key goes through.
A process that dies between queueing and recording leaves "pending" until the TTL ends; the
run it queued is then not returned to a retry. A column on TestRun written in the launch's
transaction would close that gap (see the API notes in docs/api.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import redis
from django.conf import settings

KEY_PREFIX = "pcr:idempotency"
MAX_KEY_LENGTH = 255


class IdempotencyError(Exception):
    """The key cannot be honoured; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Claim:
    """A claimed key (`replay` is None) or the run ids an earlier request recorded."""

    redis_key: str
    fingerprint: str
    replay: list[int] | None


def _client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)


def valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()


def fingerprint(scope: str, payload: object) -> str:
    material = json.dumps([scope, payload], sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(material.encode()).hexdigest()


def claim(*, user_id: int, key: str, scope: str, payload: object) -> Claim:
    """Claim `key` for this request or find what an earlier request with it did.
    `scope` names the endpoint, so one key cannot mean two different operations."""
    if not valid_key(key):
        raise IdempotencyError(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.", 400
        )
    digest = hashlib.sha256(key.encode()).hexdigest()
    redis_key = f"{KEY_PREFIX}:{user_id}:{digest}"
    mark = fingerprint(scope, payload)
    pending = json.dumps({"state": "pending", "fingerprint": mark})
    try:
        client = _client()
        if client.set(redis_key, pending, nx=True, ex=settings.IDEMPOTENCY_TTL_SECONDS):
            return Claim(redis_key, mark, None)
        stored = client.get(redis_key)
    except redis.RedisError as exc:
        raise IdempotencyError(
            "Idempotency-Key cannot be honoured right now (Redis is not "
            "reachable); retry later or send the request without it.",
            503,
        ) from exc
    if stored is None:  # expired between the two calls: claim it again
        return claim(user_id=user_id, key=key, scope=scope, payload=payload)
    record = json.loads(stored)
    if record.get("fingerprint") != mark:
        raise IdempotencyError(
            "This Idempotency-Key was already used for a different request.", 422
        )
    if record.get("state") != "done":
        raise IdempotencyError(
            "A request with this Idempotency-Key is still being processed; retry shortly.", 409
        )
    return Claim(redis_key, mark, [int(run_id) for run_id in record["runs"]])


def complete(claimed: Claim, run_ids: list[int]) -> None:
    """Record what the claimed request queued, for its retries."""
    record = json.dumps({"state": "done", "fingerprint": claimed.fingerprint, "runs": run_ids})
    try:
        _client().set(claimed.redis_key, record, ex=settings.IDEMPOTENCY_TTL_SECONDS)
    except redis.RedisError:
        # The runs are queued; only a retry's answer suffers (it would get a conflict).
        pass


def release(claimed: Claim) -> None:
    """The request failed and queued nothing: let a retry with the same key try again."""
    try:
        _client().delete(claimed.redis_key)
    except redis.RedisError:
        pass
