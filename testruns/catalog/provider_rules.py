"""What a provider may point at: which environment variable its key is read from, and which
hosts its base URL may name. One place, used by Provider.clean() (so by the admin form, the API
serializer and anything else that calls full_clean) and by providers.py at call time, so a row
saved before these rules existed still cannot send the database URL to a stranger.

Why: whoever may add or change a provider chooses where the app sends a request and which
variable's value goes in its Authorization header. Without these rules that is a way to read
any setting of the server (DATABASE_URL, REDIS_URL, SECRET_KEY, ...) or the cloud metadata
service (instance credentials) from the worker hosts. And a local command provider runs a
program on the worker hosts, so only superusers manage those (`may_manage_provider`), wherever
a provider is created, changed, tested or deleted: the admin, the API.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError

if TYPE_CHECKING:  # only for annotations: this module imports no model (models.py uses it)
    from django.contrib.auth.models import AbstractUser, AnonymousUser

    from testruns.models import Provider

# Provider.Kind.COMMAND, spelled out because models.py validates with this module.
COMMAND_KIND = "command"
COMMAND_PROVIDER_MESSAGE = "Only superusers may create or change local command providers."

# Names that look like a key of some vendor. Narrow it (e.g. ^(OPENAI|ANTHROPIC)_API_KEY$) or
# widen it with the PROVIDER_KEY_ENV_PATTERN setting; the reserved names below stay refused.
DEFAULT_KEY_ENV_PATTERN = r"^[A-Z][A-Z0-9_]*(_API_KEY|_KEY|_TOKEN)$"

# Every variable the app itself reads (project/settings.py, project/stack.py, the test suite):
# its own configuration, which holds passwords and signing keys. tests/test_provider_rules.py
# reads those files and fails when a name read there is missing here.
RESERVED_NAMES = frozenset(
    {
        "ALLOWED_HOSTS",
        "BEHIND_TLS_PROXY",
        "CASE_TIME_LIMIT_SECONDS",
        "CHANNEL_LAYER",
        "CI",
        "CSRF_COOKIE_SECURE",
        "CSRF_TRUSTED_ORIGINS",
        "DATABASE_URL",
        "DB_CONN_MAX_AGE",
        "DB_CONNECT_TIMEOUT_SECONDS",
        "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        "DB_STATEMENT_TIMEOUT_MS",
        "DB_TCP_USER_TIMEOUT_MS",
        "DEBUG",
        "DEFAULT_FROM_EMAIL",
        "DRAMATIQ_WORKER_TIMEOUT",
        "IDEMPOTENCY_TTL_SECONDS",
        "LEASE_TTL_SECONDS",
        "LOG_FORMAT",
        "LOG_LEVEL",
        "MAX_CONCURRENT_RUNS",
        "MAX_QUEUE_LENGTH",
        "MAX_RUNS_PER_USER",
        "METRICS_TOKEN",
        "METRICS_WINDOW_SECONDS",
        "PROMPTCARDS_TEST_SERVICES",
        "PROVIDER_KEY_ENV_PATTERN",
        "PYTHONUNBUFFERED",
        "REDIS_URL",
        "SECRET_KEY",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SECURE_HSTS_PRELOAD",
        "SECURE_HSTS_SECONDS",
        "SECURE_SSL_REDIRECT",
        "SESSION_COOKIE_SECURE",
        "SITE_URL",
        "SWEEP_INTERVAL_SECONDS",
        "TIME_ZONE",
        "VAR_DIR",
        "VENDOR_MAX_RESPONSE_BYTES",
        "WEB_HOST",
        "WEB_PORT",
        "WORKER_MAX_CPU_PERCENT",
        "WORKER_MIN_FREE_MEMORY_MB",
        "WORKER_POLL_MS",
        "WORKER_PROCESSES",
        "WORKER_THREADS",
    }
)
# Families the app, its supervisor, its test suite or the interpreter own
# (DJANGO_SETTINGS_MODULE, DB_STATEMENT_TIMEOUT_MS, EMBEDDED_PG_PORT, PROMPTCARDS_TEST_SERVICES,
# TEST_OUTPUT_DIR, PYTHONUNBUFFERED, ...), whatever members they gain later.
RESERVED_PREFIXES = (
    "DJANGO_",
    "DATABASE_",
    "DB_",
    "REDIS_",
    "WORKER_",
    "SECURE_",
    "METRICS_",
    "EMAIL_",
    "NOTIFY_",
    "SCHEDULE_",
    "EMBEDDED_",
    "PROMPTCARDS_",
    "TEST_",
    "BENCH_",
    "PYTHON",
)

# Cloud metadata services hand out the instance's credentials to whoever asks from the host.
METADATA_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "169.254.0.0/16",  # IPv4 link-local: AWS/GCP/Azure/Oracle 169.254.169.254, ECS .170.2
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "100.100.100.200/32",  # Alibaba Cloud
    )
)
METADATA_HOSTNAMES = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
# Validation must not hang a form on a dead resolver; an unanswered name is let through
# (the call-time check in providers.py looks again).
RESOLVE_TIMEOUT_SECONDS = 2.0
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="provider-rules-dns")


def may_manage_provider(
    user: AbstractUser | AnonymousUser, provider_or_kind: Provider | str | None
) -> bool:
    """Whether `user` may create, change, test or delete a provider of this kind (a Provider,
    or the kind a form or request asks for; None when it names none). A local command runs a
    program on the worker hosts, so only a superuser manages one; every other kind is left to
    the model permissions. Refusals say COMMAND_PROVIDER_MESSAGE."""
    kind = provider_or_kind if isinstance(provider_or_kind, str | None) else provider_or_kind.kind
    return kind != COMMAND_KIND or user.is_superuser


def key_env_pattern() -> re.Pattern[str]:
    return _compile(getattr(settings, "PROVIDER_KEY_ENV_PATTERN", "") or DEFAULT_KEY_ENV_PATTERN)


@functools.lru_cache(maxsize=4)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ImproperlyConfigured(
            f"PROVIDER_KEY_ENV_PATTERN is not a valid regular expression: {exc}"
        ) from None


def is_reserved_name(name: str) -> bool:
    # Upper-cased: Windows environments ignore case, and settings sets dramatiq_worker_timeout.
    upper = name.upper()
    return upper in RESERVED_NAMES or upper.startswith(RESERVED_PREFIXES)


def check_key_env_name(name: str) -> None:
    """Raise ValidationError unless `name` may hold a provider's API key. Empty means "no key"
    and is fine. Applies to superusers too: the rule protects the server's own secrets."""
    if not name:
        return
    if is_reserved_name(name):
        raise ValidationError(
            f"{name} is one of this app's own settings (it may hold a password or signing key), "
            "so it is never sent to a provider. Put the provider's key in a variable of its "
            "own, e.g. OPENAI_API_KEY.",
            code="reserved_key_env",
        )
    pattern = key_env_pattern()
    if not pattern.fullmatch(name):
        raise ValidationError(
            f"{name} does not match PROVIDER_KEY_ENV_PATTERN ({pattern.pattern}); by default "
            "a key variable's name ends in _API_KEY, _KEY or _TOKEN, so that a provider cannot "
            "read other variables of the server. To allow other names, set "
            "PROVIDER_KEY_ENV_PATTERN in the environment of the web and worker processes.",
            code="key_env_pattern",
        )


def is_metadata_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("%eth0")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 reaches the IPv4 address
    return any(ip in network for network in METADATA_NETWORKS)


def check_base_url(url: str, *, resolve: bool = True) -> None:
    """Raise ValidationError when `url` names a cloud metadata service, literally or through a
    hostname that resolves to one. Loopback and private addresses are fine: local model servers
    (Ollama, vLLM, LM Studio) live there. A name that does not resolve now is let through."""
    if not url:
        return
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return  # not a URL at all; the URL field's own validation says so
    if not host:
        return
    host = host.rstrip(".").lower()
    if host in METADATA_HOSTNAMES or is_metadata_address(host):
        raise _metadata_error(host)
    if resolve and (hit := _resolves_to_metadata(host)):
        raise _metadata_error(f"{host} ({hit})")


def _resolves_to_metadata(host: str) -> str | None:
    """The first metadata address `host` resolves to, if any. getaddrinfo also turns numeric
    spellings such as 2852039166 or 0xa9.0xfe.0xa9.0xfe into the address they mean."""
    future = _resolver.submit(socket.getaddrinfo, host, None)
    try:
        infos = future.result(timeout=RESOLVE_TIMEOUT_SECONDS)
    except (OSError, UnicodeError, FutureTimeout):
        return None
    for info in infos:
        address = str(info[4][0])
        if is_metadata_address(address):
            return address
    return None


def _metadata_error(what: str) -> ValidationError:
    return ValidationError(
        f"{what} is a cloud metadata address (link-local 169.254.0.0/16 or fe80::/10, "
        "fd00:ec2::254, 100.100.100.200, metadata.google.internal); it hands out the "
        "server's credentials, so no provider may call it.",
        code="metadata_base_url",
    )
