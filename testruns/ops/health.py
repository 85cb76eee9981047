"""/healthz: is the database reachable, is Redis, and is at least one worker alive?

Answers 200 when all three are, 503 naming what is not. Open without a login, and it reveals
nothing private: check names, "ok" or the kind of failure, and worker counts.
"""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from testruns.reporting import queue_stats

log = logging.getLogger(__name__)

REDIS_TIMEOUT_SECONDS = 2.0


def check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        log.warning("health check: database unreachable: %s", exc)
        return {"ok": False, "error": "the database cannot be reached"}
    return {"ok": True}


def check_redis() -> dict:
    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        log.warning("health check: Redis unreachable: %s", exc)
        return {"ok": False, "error": "Redis cannot be reached"}
    finally:
        client.close()
    return {"ok": True}


def check_workers() -> dict:
    """At least one worker heartbeat younger than queue_stats.live_after_seconds()."""
    try:
        live = queue_stats.live_worker_count()
    except DatabaseError:
        return {"ok": False, "error": "worker heartbeats cannot be read", "live": None}
    if not live:
        return {
            "ok": False,
            "error": "no worker has sent a heartbeat in the last "
            f"{queue_stats.live_after_seconds():.0f} seconds",
            "live": 0,
        }
    return {"ok": True, "live": live}


def health_report() -> dict:
    checks = {"database": check_database(), "redis": check_redis()}
    # Without the database there is nothing to read heartbeats from.
    checks["workers"] = (
        check_workers()
        if checks["database"]["ok"]
        else {"ok": False, "error": "worker heartbeats cannot be read", "live": None}
    )
    healthy = all(check["ok"] for check in checks.values())
    return {"status": "ok" if healthy else "unavailable", "checks": checks}


@login_not_required
@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    report = health_report()
    return JsonResponse(report, status=200 if report["status"] == "ok" else 503)
