"""Query parameters, checked: a bad value is a 400 naming the parameter, never a database
error."""

from __future__ import annotations

from rest_framework import exceptions
from rest_framework.request import Request

from testruns.api.serializers.shared import BIG_INT
from testruns.catalog import lookup


def query_int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise exceptions.ValidationError({name: ["Enter a whole number."]}) from None
    if not 1 <= value <= BIG_INT:
        raise exceptions.ValidationError({name: ["No object has that id."]})
    return value


def query_reference(request: Request, name: str, kind: lookup.Kind) -> int | None:
    """A card or provider to filter by, by slug / name or id (catalog.lookup): its id. An
    unknown name is a 400 saying so; an id that names nothing filters to an empty list."""
    raw = query_text(request, name)
    if raw is None:
        return None
    try:
        return lookup.filter_id(kind, raw)
    except lookup.UnknownReference as exc:
        raise exceptions.ValidationError({name: exc.messages}) from None


def query_text(request: Request, name: str, *, max_length: int = 200) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_length or "\x00" in raw:
        raise exceptions.ValidationError(
            {name: [f"Enter at most {max_length} characters, without NUL."]}
        )
    return raw


def query_choice(request: Request, name: str, choices: list[str]) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if raw not in choices:
        raise exceptions.ValidationError({name: [f"Choose one of: {', '.join(choices)}."]})
    return raw


def query_bool(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() not in ("true", "false", "1", "0"):
        raise exceptions.ValidationError({name: ["Enter true or false."]})
    return raw.lower() in ("true", "1")
