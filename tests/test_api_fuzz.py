"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis): for every
operation, valid and invalid requests (wrong types, out-of-range numbers, odd strings, extra
and missing fields) must never get a 5xx.

The app is called in-process through its WSGI handler, as a superuser with a token, against
the real database and Redis. Ids in paths and in launch bodies are pinned to objects that
exist (plus one that does not), so the fuzzing reaches the code behind a successful lookup;
generation is derandomized, so a run is repeatable.

Each operation is its own test, driven by Hypothesis through schemathesis' strategies
(`operation.as_strategy`): schemathesis' own lazy pytest loader does not work with this
pytest version, and the schema with pinned ids needs the database, which a module-level
loader would not have.
"""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from testruns.engine import admission, gate, launching, limits, scheduling
from testruns.models import PromptCard, Provider, Schedule, TestCase, TestRun

pytestmark = pytest.mark.django_db

EXAMPLES_PER_OPERATION = 40
MISSING_ID = 987_654_321
OPERATIONS = sorted(
    (method.upper(), path)
    for path, operations in SchemaGenerator().get_schema(request=None, public=True)["paths"].items()
    for method in operations
)


def pin_ids(raw: dict, ids_by_path: dict[str, list[int]], ids_by_field: dict) -> dict:
    """Draw `{id}` path parameters and the id fields of request bodies from existing ids."""
    for path, operations in raw["paths"].items():
        prefix = path.split("/")[2]
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "id":
                    parameter["schema"] = {
                        "type": "integer",
                        "enum": ids_by_path[prefix] + [MISSING_ID],
                    }
    for (component, field), ids in ids_by_field.items():
        properties = raw["components"]["schemas"][component]["properties"]
        pinned = {"type": "integer", "enum": ids + [MISSING_ID]}
        if properties[field].get("type") == "array":
            properties[field]["items"] = pinned
        else:
            properties[field] = pinned
    return raw


@pytest.fixture
def wsgi_app():
    """Django's WSGI handler, without closing the database connection around requests (as
    Django's test client does): the test's transaction lives on that connection."""
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    yield get_wsgi_application()
    for signal in (request_started, request_finished):
        signal.connect(close_old_connections)


@pytest.fixture
def api_schema(request, django_user_model, make_card, simulator):
    admin = django_user_model.objects.create_superuser("fuzzer", password="fuzzer-password-1")
    token = Token.objects.create(user=admin)
    cards = [
        make_card("fuzz-a", cases=2),
        make_card("fuzz-b", cases=1),
        make_card("fuzz-empty", cases=0),
    ]
    spare = Provider.objects.create(name="Spare", kind="simulator", model="sim-2")
    limits.ensure_semaphores(simulator)
    limits.set_limit(gate.RUNS, 1)
    runs = [launching.launch_run(card=cards[0], provider=simulator, user=admin) for _ in range(3)]
    admission.admit_runs()  # one running, two waiting
    launching.cancel_run(runs[2])
    schedule = Schedule(name="fuzz", card=cards[0], cron="@daily", owner=admin)
    scheduling.save_schedule(schedule, providers=[simulator])
    card_ids = [card.pk for card in cards]
    provider_ids = [simulator.pk, spare.pk]
    client = Client()
    client.force_login(admin)
    raw = pin_ids(
        client.get("/api/schema/?format=json").json(),
        ids_by_path={
            "cards": card_ids,
            "providers": provider_ids,
            "runs": [run.pk for run in TestRun.objects.all()],
            "cases": list(TestCase.objects.values_list("pk", flat=True)),
            "versions": list(PromptCard.objects.values_list("versions__pk", flat=True)),
            "schedules": [schedule.pk],
        },
        ids_by_field={
            ("LaunchRequest", "card"): card_ids,
            ("LaunchRequest", "provider"): provider_ids,
            ("BatchLaunchRequest", "cards"): card_ids,
            ("BatchLaunchRequest", "providers"): provider_ids,
            ("TestCaseRequest", "card"): card_ids,
            ("ScheduleRequest", "card"): card_ids,
            ("ScheduleRequest", "providers"): provider_ids,
            ("PatchedScheduleRequest", "card"): card_ids,
            ("PatchedScheduleRequest", "providers"): provider_ids,
        },
    )
    schema = schemathesis.openapi.from_dict(raw)
    # Only now: Django's test client (used above) connects those signals again after a request.
    schema.app = request.getfixturevalue("wsgi_app")
    return schema, {"Authorization": f"Token {token.key}"}


def strategy_for(operation):
    """Valid requests, and invalid ones where the operation has something to get wrong."""
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    try:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    except Exception:  # nothing to negate (no parameters and no body)
        pass
    return st.one_of(strategies)


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_generated_request_gets_a_server_error(api_schema, method, path):
    schema, auth = api_schema
    operation = schema[path][method]
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy_for(operation))
    def fuzz(case):
        response = case.call_and_validate(headers=auth, checks=[not_a_server_error])
        statuses.append(response.status_code)

    fuzz()
    # Not vacuous: every request was authenticated, and reads reached real objects.
    assert 401 not in statuses and 403 not in statuses
    if method == "GET":
        assert 200 in statuses, statuses
