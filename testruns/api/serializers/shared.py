"""What the serializers of every resource share: a model's ValidationError as DRF errors,
validation by the model's own full_clean(), and the largest id a client may send."""

from __future__ import annotations

import copy

from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Model
from rest_framework import serializers
from rest_framework.settings import api_settings

# The largest bigint: a larger id would make PostgreSQL refuse the query instead of finding
# nothing.
BIG_INT = 2**63 - 1


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
