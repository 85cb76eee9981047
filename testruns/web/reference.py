"""The assertion reference (docs/assertions.md) as a page, which the case editor links to:
the admin cannot serve files from docs/. The file is ours, in the repository, so its
Markdown is drawn as written (Python-Markdown, with fenced code and an id per heading, so
each type has its anchor: the editor links to #contains, #not-contains, ...)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import markdown
from django.conf import settings
from django.http import HttpResponse
from django.shortcuts import render
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_GET

REFERENCE = Path(settings.BASE_DIR) / "docs" / "assertions.md"


def anchor(title: str, separator: str = "-") -> str:
    """The id of a heading: "not-contains" for "not-contains", "json" for "JSON" (the
    editor's script builds the same)."""
    return re.sub(r"[^a-z0-9]+", separator, title.lower()).strip(separator)


def markdown_html(text: str) -> SafeString:
    return mark_safe(
        markdown.markdown(
            text,
            extensions=["fenced_code", "tables", "toc"],
            extension_configs={"toc": {"slugify": anchor}},
        )
    )


@lru_cache(maxsize=1)
def _reference_html(modified: float) -> SafeString:
    return markdown_html(REFERENCE.read_text(encoding="utf-8"))


@require_GET
def assertion_reference(request) -> HttpResponse:
    """docs/assertions.md, drawn again only when the file changed."""
    html = _reference_html(REFERENCE.stat().st_mtime)
    return render(request, "admin/testruns/assertion_reference.html", {"reference": html})
