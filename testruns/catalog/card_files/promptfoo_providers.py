"""promptfoo's provider ids as this app's providers: `openai:<model>`, `openai:chat:<model>`,
`anthropic:messages:<model>` and the OpenAI-compatible vendors promptfoo names (Ollama,
OpenRouter, Groq, Together, DeepSeek, Mistral, or any `apiBaseUrl`). A provider that matches
one stored (same kind and model, and base URL when one is given) is named in the report; the
others are offered to be created, disabled, with the name of their key's variable only (the
provider rules in provider_rules apply)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError

from testruns.catalog import provider_rules
from testruns.catalog.card_files.reading import Reader, at
from testruns.models import Provider

OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
# promptfoo prefix: (base URL, key variable)
COMPATIBLE = {
    "ollama": ("http://localhost:11434/v1", ""),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "togetherai": ("https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    "deepseek": ("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "mistral": ("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
}


@dataclass
class ProviderRef:
    id: str
    kind: str
    model: str
    base_url: str
    key_env: str
    parameters: dict[str, Any]
    where: str

    def matches(self, provider: Provider) -> bool:
        if provider.kind != self.kind or provider.model != self.model:
            return False
        if provider.kind == Provider.Kind.ANTHROPIC and not self.base_url:
            return True
        ours = (provider.base_url or OPENAI_DEFAULT_URL).rstrip("/")
        return ours == (self.base_url or OPENAI_DEFAULT_URL).rstrip("/")

    def find(self) -> Provider | None:
        candidates = Provider.objects.filter(kind=self.kind, model=self.model).order_by("pk")
        return next((p for p in candidates if self.matches(p)), None)

    def as_new_provider(self) -> Provider:
        """The provider to create for this id: disabled, and its key variable only if the
        provider rules allow that name."""
        key_env = self.key_env
        try:
            provider_rules.check_key_env_name(key_env)
        except ValidationError:
            key_env = ""
        name = self.id[:100]
        if Provider.objects.filter(name=name).exists():
            name = f"{self.id[:85]} (imported)"
        return Provider(
            name=name,
            kind=self.kind,
            model=self.model,
            base_url=self.base_url if self.base_url != OPENAI_DEFAULT_URL else "",
            api_key_env=key_env,
            parameters=self.parameters,
            enabled=False,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "base_url": self.base_url,
            "api_key_env": self.key_env,
        }


def _parse(provider_id: str, config: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """(kind, model, base URL, key variable) for a promptfoo id, None for one we cannot map."""
    parts = provider_id.split(":")
    base_url = config.get("apiBaseUrl") or config.get("apiHost") or ""
    base_url = base_url if isinstance(base_url, str) else ""
    key_env = config.get("apiKeyEnvar") if isinstance(config.get("apiKeyEnvar"), str) else ""
    if parts[0] == "openai" and len(parts) >= 2:
        if len(parts) == 2 and parts[1] not in ("chat", "completion", "embedding"):
            return Provider.Kind.OPENAI, parts[1], base_url, key_env or "OPENAI_API_KEY"
        if parts[1] == "chat" and len(parts) >= 3:
            return Provider.Kind.OPENAI, ":".join(parts[2:]), base_url, key_env or "OPENAI_API_KEY"
    if parts[0] == "anthropic" and len(parts) >= 3 and parts[1] == "messages":
        model = ":".join(parts[2:])
        return Provider.Kind.ANTHROPIC, model, base_url, key_env or "ANTHROPIC_API_KEY"
    if parts[0] in COMPATIBLE and len(parts) >= 2:
        model = ":".join(parts[2:] if parts[1] == "chat" and len(parts) > 2 else parts[1:])
        url, key = COMPATIBLE[parts[0]]
        return Provider.Kind.OPENAI, model, base_url or url, key_env or key
    return None


PARAMETER_KEYS = {"temperature", "max_tokens", "top_p", "seed", "stop"}


def read_provider(reader: Reader, entry: Any, where: str) -> ProviderRef | None:
    """One entry of `providers` (or a grader's `provider`): an id, or {id, config, label}."""
    if isinstance(entry, str):
        provider_id, config = entry, {}
    elif isinstance(entry, dict) and isinstance(entry.get("id"), str):
        provider_id = entry["id"]
        config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    else:
        reader.skip(where, "a provider must be an id or a mapping with `id:`")
        return None
    parsed = _parse(provider_id, config)
    if parsed is None:
        reader.skip(where, f"{provider_id}: no provider kind of this app matches it")
        return None
    parameters = {k: v for k, v in config.items() if k in PARAMETER_KEYS}
    return ProviderRef(provider_id, *parsed, parameters, where)


def read_providers(reader: Reader, providers: Any) -> list[ProviderRef]:
    if providers is None:
        return []
    entries = providers if isinstance(providers, list) else [providers]
    refs = [read_provider(reader, entry, at("providers", i)) for i, entry in enumerate(entries)]
    return [ref for ref in refs if ref is not None]


def tools_of(providers: Any) -> list[Any] | None:
    """The first `config.tools` list among the providers (for is-valid-openai-tools-call)."""
    for entry in providers if isinstance(providers, list) else []:
        tools = entry.get("config", {}).get("tools") if isinstance(entry, dict) else None
        if isinstance(tools, list) and tools:
            return tools
    return None
