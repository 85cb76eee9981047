"""What a provider call ends with: a Completion (the text, its tokens and latency) or a
ProviderError saying what went wrong (its Kind) and whether trying again may help; what a
completion costs at the provider's prices, and the token estimate used where no vendor count
can be had or trusted."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from testruns.models import Provider

VENDOR_MESSAGE_CHARS = 300  # how much of a vendor's (or a program's) own text an error quotes


class Kind:
    """What went wrong, for retry decisions, metrics and people reading the error."""

    BAD_RESPONSE = "bad_response"  # an answer that is not a completion (HTML, junk, too big)
    RATE_LIMITED = "rate_limited"  # HTTP 429
    SERVER_ERROR = "server_error"  # 5xx, 408/409, or an error object in a 200
    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, reset, DNS, TLS
    CLIENT_ERROR = "client_error"  # another 4xx: the request itself was refused
    AUTH = "auth"  # 401/403
    CONFIG = "config"  # the provider's setup: no key, unknown kind, no command
    COMMAND_FAILED = "command_failed"  # a local program exited with an error


class ProviderError(Exception):
    """A call failed. `kind` says what went wrong (see Kind); `retryable` whether trying again
    may help (429, 5xx, network); `status` is the HTTP status when there was one (a 429 also
    slows the provider down)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@dataclass
class Completion:
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    # What was not taken as the vendor sent it (untrusted usage numbers), for the result.
    notes: list[str] = field(default_factory=list)


def cost_of(provider: Provider, tokens_in: int, tokens_out: int) -> Decimal:
    """Never negative: a negative price is a typo in the admin, not a refund."""
    million = Decimal(1_000_000)
    cost = (
        provider.price_input_per_mtok * tokens_in + provider.price_output_per_mtok * tokens_out
    ) / million
    return max(cost, Decimal(0))


def rough_tokens(text: str) -> int:
    """About four characters a token: for programs and servers that count none."""
    return max(1, len(text) // 4)
