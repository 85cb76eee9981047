"""A run's settings and their bounds. The bounds are declared once, as validators on TestRun's
fields; the launch page, the admin's launch action, the API and the CLI read them from there,
so each refuses an out-of-bounds value with the model validator's own message, and
launch_run checks them again for any other caller."""

from __future__ import annotations

import math
from dataclasses import dataclass

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from testruns.models import TestRun

# The bounded numbers among a run's settings, in the order forms show them.
BOUNDED = ("max_concurrent_tests", "timeout_seconds", "max_retries", "repeats", "priority")
# Django's own words for a number that is not one (forms.FloatField's "invalid").
NOT_A_NUMBER = "Enter a number."


@dataclass(frozen=True)
class Bounds:
    """The tightest lower and upper validators of a field (the model declares the product's
    bounds; Django adds the database column's range, which is always wider)."""

    lower: MinValueValidator
    upper: MaxValueValidator

    @property
    def min_value(self) -> int | float:
        return self.lower.limit_value

    @property
    def max_value(self) -> int | float:
        return self.upper.limit_value

    @property
    def validators(self) -> list:
        return [self.lower, self.upper]


def model_field(name: str) -> models.Field:
    return TestRun._meta.get_field(name)


def bounds(name: str) -> Bounds:
    validators = model_field(name).validators
    lowers = [v for v in validators if isinstance(v, MinValueValidator)]
    uppers = [v for v in validators if isinstance(v, MaxValueValidator)]
    return Bounds(
        lower=max(lowers, key=lambda v: v.limit_value),
        upper=min(uppers, key=lambda v: v.limit_value),
    )


def default(name: str) -> int | float:
    return model_field(name).default


def setting_errors(name: str, value: object) -> list[str]:
    """Why `value` is not a valid `name` setting (empty when it is), in the model's words."""
    if isinstance(value, float) and not math.isfinite(value):
        # NaN passes every comparison, so the bounds alone would let it through.
        return [NOT_A_NUMBER]
    errors: list[str] = []
    for validator in bounds(name).validators:
        try:
            validator(value)
        except ValidationError as exc:
            errors.extend(exc.messages)
    return errors


def check_settings(values: dict) -> None:
    """Raise a ValidationError naming every bounded setting in `values` that is out of bounds."""
    errors = {
        name: problems
        for name in BOUNDED
        if name in values and (problems := setting_errors(name, values[name]))
    }
    if errors:
        raise ValidationError(errors)


def form_field(name: str, **kwargs) -> forms.Field:
    """A form field for setting `name`: the model field's type, default and help text, and its
    bounds as validators (the model's own objects, hence its messages) and as the widget's
    min and max."""
    field = model_field(name)
    limits = bounds(name)
    form_class = forms.FloatField if isinstance(field, models.FloatField) else forms.IntegerField
    options = {"initial": field.default, "help_text": field.help_text} | kwargs
    built = form_class(validators=limits.validators, **options)
    built.widget.attrs.update(min=limits.min_value, max=limits.max_value)
    return built
