"""Rendering user templates. They run in Jinja2's sandbox: a card author must not be able to
reach Python internals, and a missing variable is an error, not an empty string."""

from __future__ import annotations

from functools import lru_cache

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
# promptfoo renders an assertion's value with Nunjucks, where a missing variable is empty.
_lenient = SandboxedEnvironment(autoescape=False, keep_trailing_newline=True)


@lru_cache(maxsize=512)
def _compile(source: str):
    return _env.from_string(source)


def render_prompt(template: str, variables: dict) -> str:
    return _compile(template).render(**variables)


def render_leniently(template: str, variables: dict) -> str:
    """As promptfoo renders an assertion's value (Nunjucks, which Jinja2 reads the same for
    `{{ var }}`, filters and tags): a missing variable renders as nothing. Text without
    template syntax is returned as it is. Raises TemplateSyntaxError."""
    if "{{" not in template and "{%" not in template:
        return template
    return _lenient.from_string(template).render(**variables)


def template_variables(template: str) -> set[str]:
    """Names the template reads that it does not set itself. Raises TemplateSyntaxError."""
    return meta.find_undeclared_variables(_env.parse(template))


__all__ = ["TemplateSyntaxError", "render_leniently", "render_prompt", "template_variables"]
