"""A card's versions on the site: what a version's prompt was, what changed from the one
before, who changed it and why, and putting it back ("Restore this version", which makes a
new version: the history is never edited)."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse, HttpResponseForbidden
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from testruns.catalog import cards
from testruns.models import PromptVersion
from testruns.reporting.access import runs_visible_to
from testruns.reporting.text_diff import line_diff

RECENT_RUNS = 10


def _version_or_404(card_pk: int, number: int) -> PromptVersion:
    return get_object_or_404(
        PromptVersion.objects.select_related("card", "author"), card_id=card_pk, number=number
    )


def _may_restore(user) -> bool:
    return user.has_perm("testruns.change_promptcard")


@require_GET
def version(request, card_pk: int, number: int) -> HttpResponse:
    """One version of a card: its prompt, its diff against the version before (both fields),
    its author, date and note, the versions on either side and the latest runs that pinned
    it."""
    shown = _version_or_404(card_pk, number)
    card = shown.card
    numbers = list(card.versions.order_by("number").values_list("number", flat=True))
    earlier = [n for n in numbers if n < shown.number]
    later = [n for n in numbers if n > shown.number]
    previous = card.versions.get(number=earlier[-1]) if earlier else None
    runs = runs_visible_to(request.user).filter(version=shown).order_by("-queued_at", "-pk")
    return render(
        request,
        "testruns/version.html",
        {
            "card": card,
            "version": shown,
            "previous": previous,
            "next_number": later[0] if later else None,
            "latest_number": numbers[-1],
            "system_prompt_diff": previous
            and line_diff(previous.system_prompt, shown.system_prompt),
            "template_diff": previous and line_diff(previous.template, shown.template),
            # The card's prompt is this version's: restoring it would change nothing.
            "is_current": (card.system_prompt, card.template)
            == (shown.system_prompt, shown.template),
            "can_restore": _may_restore(request.user),
            "runs": list(runs[:RECENT_RUNS]),
        },
    )


@require_POST
def restore(request, card_pk: int, number: int) -> HttpResponse:
    """Save the version's prompt as the card's newest version (cards.restore_version) and
    show that version."""
    if not _may_restore(request.user):
        return HttpResponseForbidden("You may not change cards.")
    old = _version_or_404(card_pk, number)
    latest, created = cards.restore_version(old, user=request.user)
    if created:
        messages.success(request, f"Restored v{old.number} as v{latest.number}.")
    else:
        messages.info(request, f"v{old.number}'s prompt is already the card's (v{latest.number}).")
    return redirect("version", card_pk=card_pk, number=latest.number)
