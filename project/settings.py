"""Settings, all from the environment, with defaults that run on a developer machine.

`make run` / `make test` set DATABASE_URL and REDIS_URL to the embedded servers when they
are not given. In production set at least: DEBUG=0, SECRET_KEY, ALLOWED_HOSTS,
DATABASE_URL, REDIS_URL (see README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if not value:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


# `make run` sets DEBUG=0 and a SECRET_KEY generated into var/secret-key.txt (see
# project/stack.py); a bare `manage.py` keeps DEBUG on for development, and so do the tests.
DEBUG = env_bool("DEBUG", True)

_DEV_SECRET = "dev-only-insecure-secret-key-set-SECRET_KEY-in-production"
SECRET_KEY = os.environ.get("SECRET_KEY") or (_DEV_SECRET if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")


def _local_hosts() -> list[str]:
    """Loopback names and the address `make run` serves on (WEB_HOST), unless that is a
    wildcard, which says nothing about the names clients use."""
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    web_host = os.environ.get("WEB_HOST", "").strip()
    if ":" in web_host and not web_host.startswith("["):
        web_host = f"[{web_host}]"
    if web_host and web_host not in {"0.0.0.0", "[::]"} and web_host not in hosts:
        hosts.append(web_host)
    return hosts


ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", _local_hosts())
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
# Where people open the pages, for links made outside a request (the report URLs `manage.py
# run_card` prints). Default: where `make run` serves.
SITE_URL = (os.environ.get("SITE_URL") or "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_dramatiq",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from the app: no CDN
    "testruns",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Every page needs a login unless a view opts out explicitly (login page, health check).
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------

# Without DATABASE_URL / REDIS_URL: the embedded servers of `make run`, with the passwords it
# generated into var/ (so `manage.py shell` beside a running `make run` just works).
VAR_DIR = Path(os.environ.get("VAR_DIR") or BASE_DIR / "var")


def _credentials(user: str, service: str) -> str:
    """`user:password@` with the password `make run` generated for `service`, if any."""
    try:
        password = (VAR_DIR / f"{service}-password.txt").read_text().strip()
    except OSError:
        password = ""
    return f"{user}:{password}@" if password else (f"{user}@" if user else "")


DATABASE_URL = os.environ.get("DATABASE_URL") or (
    f"postgres://{_credentials('postgres', 'postgres')}127.0.0.1:"
    f"{env_int('EMBEDDED_PG_PORT', 54329)}/promptcards"
)
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60), conn_health_checks=True
    ),
}
# A transaction left idle while holding a semaphore row would stall every worker; PostgreSQL
# ends it instead. Statements have a ceiling for the same reason. The gate's transactions
# take milliseconds, so 10 s idle means the client is gone (a host cut off mid-transaction
# would otherwise hold the semaphore row, and every worker with it, for that long).
DATABASES["default"].setdefault("OPTIONS", {})["options"] = (
    f"-c statement_timeout={env_int('DB_STATEMENT_TIMEOUT_MS', 30000)} "
    f"-c idle_in_transaction_session_timeout={env_int('DB_IDLE_IN_TRANSACTION_TIMEOUT_MS', 10000)}"
)
# The client side of the same promise: a database that stops answering (restarted, or the
# network between us cut) is an error within seconds, which the caller can retry, instead
# of a thread stuck in a socket read for the kernel's 15 minutes.
DATABASES["default"]["OPTIONS"] |= {
    "connect_timeout": env_int("DB_CONNECT_TIMEOUT_SECONDS", 5),
    "tcp_user_timeout": env_int("DB_TCP_USER_TIMEOUT_MS", 20000),
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: Dramatiq broker and Channels layer ----------------------------------------------

REDIS_URL = os.environ.get("REDIS_URL") or (
    f"redis://{_credentials('', 'redis')}127.0.0.1:{env_int('EMBEDDED_REDIS_PORT', 63799)}/0"
)

# How events reach the pages. "pubsub" (the default): Redis pub/sub through
# testruns.live.layer. A web process subscribes once to a group however many of its pages
# joined it, and an event is one PUBLISH that each web process receives once, decodes once and
# fans out to its sockets in memory, so the cost of an event does not grow with the pages
# watching (tests/test_fanout.py; bench/realtime_bench.py measures both layers side by side).
# Pub/sub keeps nothing for a process that is not listening; the pages' snapshots and
# sequence numbers cover that, as after any reconnect. "list": channels_redis' list layer,
# one copy of every event per page in Redis, each popped by its web process in a round trip.
CHANNEL_LAYER_PUBSUB = {
    "BACKEND": "testruns.live.layer.PubSubChannelLayer",
    "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}]},
}
CHANNEL_LAYER_LIST = {
    "BACKEND": "channels_redis.core.RedisChannelLayer",
    # Reads must outlast its 5 s blocking receive (BZPOPMIN): with redis-py's default 5 s
    # socket timeout an idle consumer's read times out first and its page closes with 1011.
    "CONFIG": {
        "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
        "capacity": 1000,
        "expiry": 30,
    },
}
_CHANNEL_LAYER_CHOICES = {"pubsub": CHANNEL_LAYER_PUBSUB, "list": CHANNEL_LAYER_LIST}
_channel_layer = os.environ.get("CHANNEL_LAYER") or "pubsub"
if _channel_layer not in _CHANNEL_LAYER_CHOICES:
    # A typo must not quietly pick the other layer.
    raise ImproperlyConfigured(
        f"CHANNEL_LAYER must be one of {', '.join(_CHANNEL_LAYER_CHOICES)}, not {_channel_layer!r}."
    )
CHANNEL_LAYERS = {"default": _CHANNEL_LAYER_CHOICES[_channel_layer]}

DRAMATIQ_BROKER = {
    "BROKER": "dramatiq.brokers.redis.RedisBroker",
    # Without a socket timeout a send to a Redis that vanished mid-request waits forever,
    # and the sweeper thread that re-sends cases with it would stop repairing anything.
    # (Given in the URL: Dramatiq builds its pool from the URL alone.)
    "OPTIONS": {
        "url": REDIS_URL
        + ("&" if "?" in REDIS_URL else "?")
        + "socket_timeout=5&socket_connect_timeout=3"
    },
    "MIDDLEWARE": [
        "dramatiq.middleware.AgeLimit",
        "dramatiq.middleware.TimeLimit",
        "dramatiq.middleware.Callbacks",
        "dramatiq.middleware.Retries",
        "dramatiq.middleware.AsyncIO",
        "dramatiq.middleware.ShutdownNotifications",
        "django_dramatiq.middleware.DbConnectionsMiddleware",
        "testruns.engine.worker.LeaseKeeper",
    ],
}
DRAMATIQ_AUTODISCOVER_MODULES = ["actors"]
DRAMATIQ_TASKS_DATABASE = "default"

# An idle Dramatiq consumer polls Redis with a backoff capped at this many milliseconds
# (Dramatiq's default, 1000, would add up to a second before an idle worker sees a case).
# Dramatiq reads it from its own environment variable when `rundramatiq` execs it.
os.environ.setdefault("dramatiq_worker_timeout", str(env_int("WORKER_POLL_MS", 50)))

WORKER_PROCESSES = env_int("WORKER_PROCESSES", 2)
WORKER_THREADS = env_int("WORKER_THREADS", 8)

# --- Product settings -----------------------------------------------------------------------

MAX_CONCURRENT_RUNS = env_int("MAX_CONCURRENT_RUNS", 3)
# 0 means no per-user limit on runs in flight (then editable as the "runs-per-user" semaphore).
MAX_RUNS_PER_USER = env_int("MAX_RUNS_PER_USER", 0)
# A case lease whose worker stops heartbeating is reclaimed after this long.
LEASE_TTL_SECONDS = env_float("LEASE_TTL_SECONDS", 30.0)
SWEEP_INTERVAL_SECONDS = env_float("SWEEP_INTERVAL_SECONDS", 2.0)
# A vendor's answer larger than this is refused while it streams in (a real completion is far
# smaller; a misconfigured URL or a hostile server could otherwise take a worker's memory).
VENDOR_MAX_RESPONSE_BYTES = env_int("VENDOR_MAX_RESPONSE_BYTES", 4 * 1024 * 1024)
# Dramatiq's time limit for one case message; a case that reaches it ends as an error.
CASE_TIME_LIMIT_SECONDS = env_float("CASE_TIME_LIMIT_SECONDS", 30 * 60)
# Admission control: launching answers "queue full" (HTTP 429 in the API) while this many runs
# wait. 0 means no limit.
MAX_QUEUE_LENGTH = env_int("MAX_QUEUE_LENGTH", 1000)
# Resource-aware admission: a worker takes no new case while its host's CPU is above this
# percentage or its free memory below this many MB. 0 turns each check off.
WORKER_MAX_CPU_PERCENT = env_float("WORKER_MAX_CPU_PERCENT", 0)
WORKER_MIN_FREE_MEMORY_MB = env_float("WORKER_MIN_FREE_MEMORY_MB", 0)
# How long the API remembers an Idempotency-Key (in Redis).
IDEMPOTENCY_TTL_SECONDS = env_int("IDEMPOTENCY_TTL_SECONDS", 24 * 3600)
# /metrics: when METRICS_TOKEN is set, scrapers must send "Authorization: Bearer <token>".
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
# Every worker process looks for due schedules this often (PostgreSQL decides which launches).
SCHEDULE_INTERVAL_SECONDS = env_float("SCHEDULE_INTERVAL_SECONDS", 1.0)
# Notifications: attempts per delivery, the backoff before the second (doubling after each
# failure, capped) and how long one attempt may take.
NOTIFY_MAX_ATTEMPTS = env_int("NOTIFY_MAX_ATTEMPTS", 6)
NOTIFY_RETRY_BASE_SECONDS = env_float("NOTIFY_RETRY_BASE_SECONDS", 10.0)
NOTIFY_RETRY_MAX_SECONDS = env_float("NOTIFY_RETRY_MAX_SECONDS", 600.0)
NOTIFY_TIMEOUT_SECONDS = env_float("NOTIFY_TIMEOUT_SECONDS", 10.0)

# --- E-mail (notifications) -----------------------------------------------------------------

# With EMAIL_HOST set, mail goes out through that SMTP server; without it, to the console
# (the worker's log), so nothing leaves a developer machine.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "")
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND") or (
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend"
)
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "prompt-card-runner@localhost")

# --- API ------------------------------------------------------------------------------------

REST_FRAMEWORK = {
    # Token first: an anonymous request then gets 401 with `WWW-Authenticate: Token`.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "testruns.api.protocol.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_PARSER_CLASSES": ["testruns.api.protocol.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "testruns.api.protocol.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Prompt Card Runner API",
    "DESCRIPTION": "Queue and watch test runs of prompt cards; manage cards, test cases and "
    "providers. Authenticate with a session or `Authorization: Token <key>`.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "testruns.models.TestRun.Status",
        "ResultStatusEnum": "testruns.models.TestResult.Status",
        "ProviderKindEnum": "testruns.models.Provider.Kind",
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Auth, i18n, static ---------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve straight from the app and project folders, so no collectstatic step is needed.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# --- Production hardening (on whenever DEBUG is off) -----------------------------------------

SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
if env_bool("BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Lines about a run end in "run=<id> case=<id>"; LOG_FORMAT=json writes JSON lines instead.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"run_context": {"()": "testruns.ops.log_context.RunContextFilter"}},
    "formatters": {
        "plain": {"()": "testruns.ops.log_context.PlainFormatter"},
        "json": {"()": "testruns.ops.log_context.JSONFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["run_context"],
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
    },
}

# --- Provider keys --------------------------------------------------------------------------

# The names a provider's api_key_env may take (a regular expression, matched in full). The
# app's own settings (DATABASE_URL, SECRET_KEY, ...) stay refused whatever it says; see
# testruns/provider_rules.py and docs/operations.md "Provider keys".
PROVIDER_KEY_ENV_PATTERN = os.environ.get(
    "PROVIDER_KEY_ENV_PATTERN", r"^[A-Z][A-Z0-9_]*(_API_KEY|_KEY|_TOKEN)$"
)
