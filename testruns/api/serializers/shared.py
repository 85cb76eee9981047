"""What the serializers of every resource share: a model's ValidationError as DRF errors,
validation by the model's own full_clean(), the largest id a client may send, and fields
that take a card or a provider by name or id (catalog.lookup)."""

from __future__ import annotations

import copy

from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Model
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.settings import api_settings

from testruns.catalog import lookup

# The largest bigint: a larger id would make PostgreSQL refuse the query instead of finding
# nothing. One definition, the resolver's, which guards its queries with it.
BIG_INT = lookup.BIG_INT
# Longer than any slug or provider name the models allow.
MAX_REFERENCE_CHARS = 200


def model_errors(exc: DjangoValidationError) -> dict | list:
    """A Django ValidationError as DRF's field -> messages mapping."""
    if not hasattr(exc, "error_dict"):
        return {api_settings.NON_FIELD_ERRORS_KEY: exc.messages}
    return {
        api_settings.NON_FIELD_ERRORS_KEY if field == NON_FIELD_ERRORS else field: messages
        for field, messages in exc.message_dict.items()
    }


class ModelCleanMixin:
    """After field validation, apply the input to a copy of the object and run the model's
    full_clean(): its clean() and unique checks decide, with their messages."""

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)  # type: ignore[misc]
        candidate = self.candidate(attrs)
        try:
            candidate.full_clean()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(model_errors(exc)) from None
        return attrs

    def candidate(self, attrs: dict) -> Model:
        instance = self.instance  # type: ignore[attr-defined]
        candidate = copy.copy(instance) if instance is not None else self.Meta.model()  # type: ignore[attr-defined]
        for name, value in attrs.items():
            setattr(candidate, name, value)
        return candidate


class ReferenceField(serializers.Field):
    """A card or provider given as people name it (a slug / name) or by id. Resolved through
    catalog.lookup, as the CLI resolves its arguments, so an unknown name is a 400 saying
    which, with a "did you mean". As the child of a ReferenceListField it only checks the
    shape: the list resolves all its items in one query."""

    kind: lookup.Kind

    def __init__(self, *, resolve: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.resolve = resolve

    def to_internal_value(self, data: object) -> object:
        reference = self.reference(data)
        if not self.resolve:
            return reference
        try:
            return lookup.resolve_one(self.kind, reference)
        except lookup.UnknownReference as exc:
            raise serializers.ValidationError(exc.messages) from None

    def reference(self, data: object) -> lookup.Reference:
        if isinstance(data, str) and 0 < len(data) <= MAX_REFERENCE_CHARS:
            return data
        if isinstance(data, int) and not isinstance(data, bool):  # True is an int to Python
            return data
        raise serializers.ValidationError(
            f"Give the {self.kind.noun}'s {self.kind.field} (text) or its id (a number)."
        )

    def to_representation(self, value: Model) -> int:
        return value.pk


@extend_schema_field(
    {"oneOf": [{"type": "string"}, {"type": "integer"}], "example": "support-reply"}
)
class CardField(ReferenceField):
    kind = lookup.CARD


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "integer"}], "example": "Simulator"})
class ProviderField(ReferenceField):
    kind = lookup.PROVIDER


class ReferenceListField(serializers.ListField):
    """A list of cards or providers by name or id, resolved in one query; every unknown one
    is named in the field's errors."""

    child: ReferenceField

    def __init__(self, *, child: ReferenceField, **kwargs):
        child.resolve = False
        super().__init__(child=child, **kwargs)

    def to_internal_value(self, data: object) -> list[Model]:
        references = super().to_internal_value(data)
        try:
            return lookup.resolve(self.child.kind, references)
        except lookup.UnknownReference as exc:
            raise serializers.ValidationError(exc.messages) from None
