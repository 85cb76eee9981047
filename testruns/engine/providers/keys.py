"""The API key: read from the environment variable the provider names, at call time, after
the provider rules are checked once more; and kept out of every text a vendor sends back."""

from __future__ import annotations

import os

from django.core.exceptions import ValidationError

from testruns.catalog import provider_rules
from testruns.engine.providers.completion import Kind, ProviderError
from testruns.models import Provider

NO_KEY = "not-needed"  # local servers want no key, but the SDKs refuse to start without one


def api_key(provider: Provider) -> str:
    """Read at call time, so a rotated key needs no restart. The provider rules are checked
    again here, the last line of defence for a row saved before they existed (or written
    behind the models' validation): no server secret is sent, and nothing goes to a cloud
    metadata address."""
    try:
        provider_rules.check_base_url(provider.base_url, resolve=False)
        if provider.api_key_env:
            provider_rules.check_key_env_name(provider.api_key_env)
    except ValidationError as exc:
        raise ProviderError(exc.messages[0], kind=Kind.CONFIG) from None
    if not provider.api_key_env:
        return NO_KEY
    key = os.environ.get(provider.api_key_env)
    if not key:
        raise ProviderError(
            f"the environment variable {provider.api_key_env} that should hold the API key "
            "is not set",
            kind=Kind.CONFIG,
        )
    return key


def redact(text: str, key: str) -> str:
    # Vendors echo a rejected key back ("Incorrect API key provided: sk-...").
    return text.replace(key, "[redacted]") if key and key != NO_KEY else text
