"""Cards and their versions: saving a card snapshots a new version when its prompt changed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max

from testruns.models import PromptCard, PromptVersion, TestCase, TestRun

if TYPE_CHECKING:  # only for annotations: the user model is whatever AUTH_USER_MODEL names
    from django.contrib.auth.base_user import AbstractBaseUser


def save_card(
    card: PromptCard, *, user: AbstractBaseUser | None = None, note: str = ""
) -> PromptVersion:
    """Save the card and return its latest version, a new one if the prompt changed. Every
    place that saves a card from user input (the admin, the API, imports) comes through here.

    1. A new card without an owner belongs to `user`.
    2. Save the card.
    3. Snapshot a version, by `user` with `note`, in the same transaction as the save, so no
       committed card has a prompt without its version.
    """
    if card._state.adding and card.owner_id is None:
        card.owner = user
    # savepoint=False: inside a caller's transaction (the admin's, an import's) a failure rolls
    # everything back anyway, so a savepoint per card would only add two round trips.
    with transaction.atomic(savepoint=False):
        card.save()
        return snapshot_version(card, author=user, note=note)


def snapshot_version(
    card: PromptCard, *, author: AbstractBaseUser | None = None, note: str = ""
) -> PromptVersion:
    """Return the card's latest version, creating a new one if the prompt has changed."""
    latest = card.versions.order_by("-number").first()
    if latest and (latest.system_prompt, latest.template) == (card.system_prompt, card.template):
        return latest
    number = (card.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    return PromptVersion.objects.create(
        card=card,
        number=number,
        system_prompt=card.system_prompt,
        template=card.template,
        author=author,
        change_note=note or ("Created" if number == 1 else ""),
    )


def restore_version(
    version: PromptVersion, *, user: AbstractBaseUser | None = None
) -> tuple[PromptVersion, bool]:
    """Make `version`'s prompt the card's again, as a NEW version noted "Restored vN"; the
    history is never edited. Returns the card's latest version and whether it is new (False
    when the card's prompt is that prompt already: nothing is saved).

    1. Lock the card's row and read it afresh, so that the fields someone saved since the
       caller read the card (its name, its baseline) are kept, and two restores at once
       make their versions one after the other.
    2. Put the version's system prompt and template back and save through save_card.
    """
    with transaction.atomic():
        card = PromptCard.objects.select_for_update().get(pk=version.card_id)
        prompt = (version.system_prompt, version.template)
        if (card.system_prompt, card.template) == prompt:
            return snapshot_version(card, author=user), False
        card.system_prompt, card.template = prompt
        return save_card(card, user=user, note=f"Restored v{version.number}"), True


def duplicate_card(card: PromptCard, *, user: AbstractBaseUser | None = None) -> PromptCard:
    """Copy a card with its test cases under a free "<slug>-copy[-N]" slug; history stays."""
    slug, n = f"{card.slug}-copy", 1
    while PromptCard.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{card.slug}-copy-{n}"
    with transaction.atomic():
        copy = PromptCard.objects.create(
            name=f"{card.name} (copy)",
            slug=slug,
            description=card.description,
            tags=card.tags,
            owner=user or card.owner,
            system_prompt=card.system_prompt,
            template=card.template,
            grader_provider=card.grader_provider,
        )
        TestCase.objects.bulk_create(
            TestCase(
                card=copy,
                name=case.name,
                variables=case.variables,
                assertions=case.assertions,
                threshold=case.threshold,
                tags=case.tags,
                enabled=case.enabled,
                order=case.order,
            )
            for case in card.cases.all()
        )
        snapshot_version(copy, author=user, note=f"Duplicated from {card.slug}")
    return copy


BASELINE_OF_ANOTHER_CARD = "Pick a run of this card."


def check_baseline(card: PromptCard | None, run: TestRun | None) -> None:
    """Only a run of the card may be its baseline (a card not saved yet has no runs)."""
    if run is not None and (card is None or card.pk is None or run.card_id != card.pk):
        raise ValidationError({"baseline_run": BASELINE_OF_ANOTHER_CARD})


def pin_baseline(card: PromptCard, run: TestRun | None) -> None:
    """Pin `run` as the baseline `card`'s reports compare against (None unpins it), checked
    by check_baseline. Only the baseline is written, so a pin never puts back fields of the
    card read before someone else saved it."""
    check_baseline(card, run)
    PromptCard.objects.filter(pk=card.pk).update(baseline_run=run)
    card.baseline_run = run
