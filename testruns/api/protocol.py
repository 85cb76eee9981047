"""How the API speaks, apart from its views: JSON in (refusing what PostgreSQL cannot store),
pages of lists, and errors as JSON. Named in settings.REST_FRAMEWORK, so it must not import
rest_framework.views at module level (that import reads these settings: a cycle)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError
from django.db.models import ProtectedError, RestrictedError
from rest_framework import exceptions, parsers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.settings import api_settings

from testruns.api import idempotency
from testruns.api.serializers.shared import model_errors
from testruns.catalog import card_files
from testruns.engine import launching

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 64
# launching.launch_runs' arguments named as the launch requests name them, so a LaunchError
# is shown on the request's own field (a disabled provider under "provider" in a batch too).
LAUNCH_FIELDS = {"providers": "provider", "case_ids": "test_cases"}


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


def unstorable_text(data: object) -> str | None:
    """Why PostgreSQL could not store this parsed JSON (a NUL or a lone surrogate in some
    text, or nesting deeper than MAX_JSON_DEPTH), else None. Iterative: no recursion."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"The JSON is nested deeper than {MAX_JSON_DEPTH} levels."
        if isinstance(value, str):
            if card_files.UNSTORABLE_TEXT.search(value):
                return "Text may not contain NUL characters or unpaired surrogates."
        elif isinstance(value, dict):
            stack.extend((key, depth + 1) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


class JSONParser(parsers.JSONParser):
    """DRF's strict JSON parser, refusing what the database cannot store as a 400. (Bodies
    over DATA_UPLOAD_MAX_MEMORY_SIZE never get here: reading them raises RequestDataTooBig.)"""

    def parse(self, stream, media_type=None, parser_context=None) -> object:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply.") from None
        problem = unstorable_text(data)
        if problem:
            raise exceptions.ParseError(problem)
        return data


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state."
    default_code = "conflict"


class QueueFullError(exceptions.Throttled):
    """Admission control: 429 with the reason, and a hint when to try again."""

    default_code = "queue_full"

    def __init__(self, message: str):
        super().__init__(wait=30, detail=message)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """DRF's handler, after turning domain and database errors into JSON answers."""
    if isinstance(exc, RequestDataTooBig):
        exc = _status_error(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.",
        )
    elif isinstance(exc, launching.QueueFull):
        exc = QueueFullError(str(exc))
    elif isinstance(exc, launching.LaunchError):
        field = LAUNCH_FIELDS.get(exc.field, exc.field) or api_settings.NON_FIELD_ERRORS_KEY
        exc = exceptions.ValidationError({field: [str(exc)]})
    elif isinstance(exc, idempotency.IdempotencyError):
        exc = _status_error(exc.status, str(exc))
    elif isinstance(exc, ProtectedError | RestrictedError):
        exc = Conflict("It is still in use (runs refer to it), so it cannot be deleted.")
    elif isinstance(exc, IntegrityError):
        # Validation passed, so a concurrent request changed the same rows first.
        exc = Conflict("It conflicts with a change made at the same time; try again.")
    elif isinstance(exc, DataError):
        log.warning("database refused a value that validation let through", exc_info=exc)
        exc = exceptions.ValidationError(
            {"non_field_errors": ["A value is out of the range the database can store."]}
        )
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(model_errors(exc))
    # Imported here: DRF imports this module while it defines its views (settings name it),
    # so importing rest_framework.views at the top would be circular.
    from rest_framework.views import exception_handler as drf_exception_handler

    return drf_exception_handler(exc, context)


def _status_error(code: int, message: str) -> exceptions.APIException:
    error = exceptions.APIException(message)
    error.status_code = code
    return error
