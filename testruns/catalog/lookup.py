"""Cards and providers by the names people use: a card's slug or id, a provider's name or
id. The one place that turns them into objects, shared by the API (launch bodies and list
filters) and the CLI, so both accept the same references and refuse them in the same words.

A JSON number is an id. Text is a slug / name, or, when nothing has that slug / name and it
is all digits, an id (the CLI's arguments and query parameters are always text). An
unknown reference raises UnknownReference, naming it, with the closest names when some
are near (difflib), e.g. "No card with the slug 'refund-polcy'. Did you mean
'refund-policy'?".
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from django.db.models import Model, Q

from testruns.models import PromptCard, Provider

# The largest bigint: a larger id would make PostgreSQL refuse the query, so such an id is
# simply unknown.
BIG_INT = 2**63 - 1
# A "did you mean" reads the names of at most this many objects: it is only on the error
# path, but must stay cheap with a catalog of any size.
SUGGESTION_POOL = 5_000
MAX_SUGGESTIONS = 3

Reference = int | str


@dataclass(frozen=True)
class Kind:
    """What is being looked up, and what the messages call it."""

    model: type[Model]
    field: str  # the unique text field people name it by
    noun: str

    def unknown_text(self, text: str) -> str:
        if self.field == "slug":
            return f"No {self.noun} with the slug {text!r}."
        return f"No {self.noun} named {text!r}."


CARD = Kind(PromptCard, "slug", "card")
PROVIDER = Kind(Provider, "name", "provider")


class UnknownReference(LookupError):
    """References that name nothing; `messages` has one sentence per unknown reference."""

    def __init__(self, messages: list[str]):
        super().__init__(" ".join(messages))
        self.messages = messages


def as_id(reference: Reference) -> int | None:
    """The id a reference may stand for: a number, or text of digits only."""
    if isinstance(reference, str):
        if not (reference.isascii() and reference.isdigit()):
            return None
        reference = int(reference)
    return reference if 1 <= reference <= BIG_INT else None


def resolve(kind: Kind, references: Sequence[Reference]) -> list[Model]:
    """The objects the references name, in their order (duplicates kept), from one query;
    UnknownReference for every one that names nothing."""
    texts = {ref for ref in references if isinstance(ref, str)}
    ids = {pk for ref in references if (pk := as_id(ref)) is not None}
    found = list(
        kind.model.objects.filter(Q(**{f"{kind.field}__in": texts}) | Q(pk__in=ids))
        if texts or ids
        else []
    )
    by_text = {getattr(obj, kind.field): obj for obj in found}
    by_id = {obj.pk: obj for obj in found}
    objects, unknown = [], []
    for ref in references:
        # Text names first: a card slugged "2024" is that card, not the card with id 2024.
        obj = by_text.get(ref) if isinstance(ref, str) else None
        if obj is None and (pk := as_id(ref)) is not None:
            obj = by_id.get(pk)
        if obj is None:
            unknown.append(ref)
        else:
            objects.append(obj)
    if unknown:
        raise UnknownReference([unknown_message(kind, ref) for ref in dict.fromkeys(unknown)])
    return objects


def resolve_one(kind: Kind, reference: Reference) -> Model:
    return resolve(kind, [reference])[0]


def filter_id(kind: Kind, reference: str) -> int:
    """The id to filter a list by, from a query parameter. Digits that name nothing stay an
    id as they always were (the list is then empty); an unknown name is UnknownReference."""
    pk = as_id(reference)
    match = kind.model.objects.filter(**{kind.field: reference}).values_list("pk", flat=True)
    found = match.first()
    if found is not None:
        return found
    if pk is not None:
        return pk
    raise UnknownReference([unknown_message(kind, reference)])


def unknown_message(kind: Kind, reference: Reference) -> str:
    if not isinstance(reference, str):
        return f"No {kind.noun} with the id {reference}."
    if as_id(reference) is not None:
        return f"No {kind.noun} with the {kind.field} or id {reference!r}."
    message = kind.unknown_text(reference)
    near = suggestions(kind, reference)
    if near:
        message += f" Did you mean {' or '.join(repr(name) for name in near)}?"
    return message


def suggestions(kind: Kind, text: str) -> list[str]:
    """The existing names closest to `text`, ignoring case (so "simulator" finds
    "Simulator")."""
    names = kind.model.objects.order_by(kind.field).values_list(kind.field, flat=True)
    folded: dict[str, str] = {}
    for name in names[:SUGGESTION_POOL]:
        folded.setdefault(name.casefold(), name)
    near = difflib.get_close_matches(text.casefold(), folded, n=MAX_SUGGESTIONS, cutoff=0.6)
    return [folded[key] for key in near]
