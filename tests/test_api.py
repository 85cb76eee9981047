"""The REST API against the real database and Redis: every endpoint, its permissions, its
validation (the models' own) and its JSON errors."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from testruns.api.serializers.runs import BatchLaunchSerializer, LaunchSerializer
from testruns.catalog import demo
from testruns.engine import admission, gate, launching, limits
from testruns.models import PromptCard, PromptVersion, Provider, Semaphore, TestCase, TestRun

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def grant(user, *codenames: str):
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return type(user).objects.get(pk=user.pk)  # a fresh object: permissions are cached


@pytest.fixture
def api(launcher) -> APIClient:
    """A launcher (may launch and cancel, sees only their own runs) with a token."""
    return client_for(launcher)


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", password="root-password-1")


@pytest.fixture
def root_api(superuser) -> APIClient:
    return client_for(superuser)


@pytest.fixture
def editor(django_user_model):
    user = django_user_model.objects.create_user("eddie", password="eddie-password-1")
    return grant(
        user,
        *[
            f"{verb}_{model}"
            for verb in ("add", "change", "delete", "view")
            for model in ("promptcard", "testcase", "provider")
        ],
    )


def launch(client: APIClient, card, provider, **fields):
    return client.post(
        "/api/runs/", {"card": card.pk, "provider": provider.pk, **fields}, format="json"
    )


# --- Authentication -------------------------------------------------------------------------

ENDPOINTS = [
    "/api/runs/",
    "/api/runs/active/",
    "/api/runs/1/",
    "/api/runs/1/progress/",
    "/api/runs/1/results/",
    "/api/queue/stats/",
    "/api/system/resources/",
    "/api/cards/",
    "/api/cases/",
    "/api/versions/",
    "/api/providers/",
    "/api/schema/?format=json",
]


def test_anonymous_requests_get_401_in_json_not_a_login_page(client):
    for url in ENDPOINTS:
        response = client.get(url)
        assert response.status_code == 401, url
        assert json.loads(response.content) == {
            "detail": "Authentication credentials were not provided."
        }, url
    assert client.post("/api/runs/", {}, content_type="application/json").status_code == 401


def test_a_wrong_token_is_refused(client):
    response = client.get("/api/runs/", HTTP_AUTHORIZATION="Token not-a-real-token")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid token."}


def test_session_authentication_works_and_its_writes_need_the_csrf_token(
    launcher, make_card, simulator
):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(launcher)
    assert client.get("/api/runs/").status_code == 200
    refused = launch(client, make_card(), simulator)
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    assert not TestRun.objects.exists()


def test_schema_is_openapi_and_docs_page_serves_its_assets_locally(client, user):
    client.force_login(user)
    schema = client.get("/api/schema/?format=json").json()
    assert schema["openapi"].startswith("3.")
    assert {
        "/api/runs/",
        "/api/runs/batch/",
        "/api/runs/{id}/progress/",
        "/api/queue/stats/",
        "/api/system/resources/",
        "/api/cards/",
        "/api/providers/",
    } <= set(schema["paths"])
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "swagger-ui" in html and "cdn" not in html.lower() and "https://" not in html


def test_docs_page_sends_anonymous_visitors_to_the_login_page(client):
    response = client.get("/api/docs/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


# --- Queueing runs --------------------------------------------------------------------------


def test_launch_answers_201_with_id_status_and_queue_position(api, make_card, simulator):
    card = make_card()
    first = launch(api, card, simulator)
    second = launch(api, card, simulator, priority=-1)
    assert first.status_code == second.status_code == 201
    body = second.json()
    run = TestRun.objects.get(pk=body["id"])
    assert body["status"] == "queued" and body["queue_position"] == 2
    assert first.json()["queue_position"] == 1
    assert second["Location"] == f"/api/runs/{run.pk}/"
    assert body["card"] == {"id": card.pk, "slug": card.slug, "name": card.name}
    assert body["total_cases"] == 3 and run.results.count() == 3


def test_launch_stores_the_whole_configuration(api, make_card, simulator, launcher):
    response = launch(
        api,
        make_card(),
        simulator,
        priority=7,
        max_concurrent_tests=2,
        timeout_seconds=12.5,
        stop_on_failure=True,
        retry_failed=False,
        max_retries=5,
        use_cache=True,
        repeats=3,
    )
    assert response.status_code == 201, response.json()
    run = TestRun.objects.get()
    assert (
        run.priority,
        run.max_concurrent_tests,
        run.timeout_seconds,
        run.stop_on_failure,
        run.max_retries,
        run.use_cache,
        run.repeats,
        run.launched_by,
    ) == (7, 2, 12.5, True, 0, True, 3, launcher)


def test_launch_runs_the_chosen_case_ids_or_the_cases_with_a_tag(api, make_card, simulator):
    card = make_card(cases=4)
    cases = list(card.cases.all())
    TestCase.objects.filter(pk__in=[cases[1].pk, cases[3].pk]).update(tags=["smoke"])
    by_id = launch(api, card, simulator, test_cases=[cases[2].pk, cases[0].pk])
    by_tag = launch(api, card, simulator, tags=["smoke", "nothing"])
    assert by_id.status_code == by_tag.status_code == 201
    names = lambda response: list(  # noqa: E731
        TestRun.objects.get(pk=response.json()["id"]).results.values_list("case_name", flat=True)
    )
    assert names(by_id) == ["case 0", "case 2"]
    assert names(by_tag) == ["case 1", "case 3"]


def test_launch_explains_bad_case_choices_on_their_fields(api, make_card, simulator):
    card, other = make_card(), make_card("other")
    foreign = other.cases.first()
    assert launch(api, card, simulator, test_cases=[foreign.pk]).json() == {
        "test_cases": [f"Greeting has no test case with the id {foreign.pk}."]
    }
    assert launch(api, card, simulator, tags=["missing"]).json() == {
        "tags": ["Greeting has no enabled test case tagged missing."]
    }
    both = launch(api, card, simulator, tags=["x"], test_cases=[card.cases.first().pk])
    assert both.status_code == 400
    assert both.json() == {"tags": ["Choose the cases by id or by tag, not both."]}
    empty = launch(api, make_card("empty", cases=0), simulator)
    assert empty.json() == {"non_field_errors": ["Empty has no enabled test cases to run."]}
    assert not TestRun.objects.exists()


def test_launch_rejects_wrong_types_and_out_of_range_values_field_by_field(
    api, make_card, simulator
):
    card = make_card()
    response = api.post(
        "/api/runs/",
        {
            "card": 10**30,
            "provider": "sim",
            "priority": 10**40,
            "max_concurrent_tests": 0,
            "timeout_seconds": "NaN",
            "repeats": "many",
            "test_cases": [-1],
            "stop_on_failure": "perhaps",
        },
        format="json",
    )
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) == {
        "card",
        "provider",
        "priority",
        "max_concurrent_tests",
        "timeout_seconds",
        "repeats",
        "test_cases",
        "stop_on_failure",
    }
    assert errors["priority"] == ["Ensure this value is less than or equal to 100."]
    assert launch(api, card, simulator, priority=101).json() == {
        "priority": ["Ensure this value is less than or equal to 100."]
    }
    assert not TestRun.objects.exists()


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"card": 1,', "JSON parse error"),
        (b'{"card": "\\u0000"}', "NUL"),
        (b'{"card": "\\ud800"}', "surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"card": NaN}', "JSON parse error"),
    ],
)
def test_malformed_json_is_a_400_that_says_why(api, body, message):
    response = api.post("/api/runs/", body, content_type="application/json")
    assert response.status_code == 400
    assert message in response.json()["detail"]


def test_a_body_over_the_upload_limit_is_413(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = api.post("/api/runs/", {"card": "x" * 1000}, format="json")
    assert response.status_code == 413
    assert response.json() == {"detail": "The request body is larger than 1000 bytes."}


def test_the_browsable_api_renders_for_people(client, launcher, make_card, simulator):
    client.force_login(launcher)
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    for url in (
        "/api/",
        "/api/runs/",
        f"/api/runs/{run.pk}/",
        f"/api/runs/{run.pk}/progress/",
        "/api/cards/",
        "/api/queue/stats/",
    ):
        response = client.get(url, HTTP_ACCEPT="text/html")
        assert response.status_code == 200, url
        assert response["Content-Type"].startswith("text/html"), url


def test_non_json_bodies_are_415(api):
    response = api.post("/api/runs/", "card=1", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415


def test_a_disabled_provider_is_a_field_error(api, make_card, simulator):
    Provider.objects.filter(pk=simulator.pk).update(enabled=False)
    response = launch(api, make_card(), simulator)
    assert response.status_code == 400
    assert response.json() == {"provider": ["Provider Test simulator is disabled."]}


def test_launch_needs_the_launch_permission(user, make_card, simulator):
    response = launch(client_for(user), make_card(), simulator)
    assert response.status_code == 403
    assert response.json() == {"detail": "You may not launch runs."}
    assert not TestRun.objects.exists()


def test_a_retry_with_the_same_idempotency_key_does_not_queue_twice(api, make_card, simulator):
    card, key = make_card(), str(uuid.uuid4())
    first = api.post(
        "/api/runs/",
        {"card": card.pk, "provider": simulator.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    again = api.post(
        "/api/runs/",
        {"provider": simulator.pk, "card": card.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    assert TestRun.objects.count() == 1
    other = api.post(
        "/api/runs/",
        {"card": card.pk, "provider": simulator.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY=str(uuid.uuid4()),
    )
    assert other.json()["id"] != first.json()["id"]


def test_an_idempotency_key_reused_for_another_request_is_refused(api, make_card, simulator):
    card, key = make_card(), str(uuid.uuid4())
    launch_with_key = lambda **fields: api.post(  # noqa: E731
        "/api/runs/",
        {"card": card.pk, "provider": simulator.pk, **fields},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    assert launch_with_key().status_code == 201
    refused = launch_with_key(priority=5)
    assert refused.status_code == 422
    assert "already used for a different request" in refused.json()["detail"]
    assert TestRun.objects.count() == 1


def test_a_failed_request_frees_its_idempotency_key_for_the_corrected_retry(
    api, make_card, simulator
):
    card, key = make_card(), str(uuid.uuid4())
    Provider.objects.filter(pk=simulator.pk).update(enabled=False)
    # Input is validated before the key is claimed; a failure after the claim releases it.
    assert launch(api, card, simulator).status_code == 400
    empty = make_card("empty", cases=0)
    failed = api.post(
        "/api/runs/",
        {"card": empty.pk, "provider": simulator.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    assert failed.status_code == 400
    Provider.objects.filter(pk=simulator.pk).update(enabled=True)
    assert (
        api.post(
            "/api/runs/",
            {"card": empty.pk, "provider": simulator.pk},
            format="json",
            HTTP_IDEMPOTENCY_KEY=key,
        ).status_code
        == 400
    )
    TestCase.objects.create(card=empty, name="now there is one", variables={"name": "x"})
    retried = api.post(
        "/api/runs/",
        {"card": empty.pk, "provider": simulator.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried


def test_idempotency_keys_belong_to_their_user(api, make_card, simulator, django_user_model):
    card, key = make_card(), str(uuid.uuid4())
    other = grant(
        django_user_model.objects.create_user("bob", password="bob-password-1"), "launch_testrun"
    )
    mine = api.post(
        "/api/runs/",
        {"card": card.pk, "provider": simulator.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    theirs = client_for(other).post(
        "/api/runs/",
        {"card": card.pk, "provider": simulator.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


def test_an_unusable_idempotency_key_is_a_400(api, make_card, simulator):
    response = api.post(
        "/api/runs/",
        {"card": make_card().pk, "provider": simulator.pk},
        format="json",
        HTTP_IDEMPOTENCY_KEY="x" * 256,
    )
    assert response.status_code == 400 and "Idempotency-Key" in response.json()["detail"]


def test_a_full_queue_answers_429_and_queues_nothing(api, make_card, simulator, settings):
    settings.MAX_QUEUE_LENGTH = 2
    card = make_card()
    assert [launch(api, card, simulator).status_code for _ in range(2)] == [201, 201]
    refused = launch(api, card, simulator)
    assert refused.status_code == 429
    assert refused.json()["detail"].startswith(
        "The queue is full: 2 runs are waiting and the limit is 2. "
        "Try again when some have started."
    )
    assert refused["Retry-After"] == "30"
    assert TestRun.objects.count() == 2
    batch = api.post(
        "/api/runs/batch/", {"cards": [card.pk], "providers": [simulator.pk]}, format="json"
    )
    assert batch.status_code == 429


def test_batch_queues_a_run_per_card_and_provider_sharing_a_comparison_group(
    api, make_card, simulator
):
    cards = [make_card("one", cases=2), make_card("two", cases=1)]
    other = Provider.objects.create(name="Second", kind="simulator", model="sim-2")
    response = api.post(
        "/api/runs/batch/",
        {
            "cards": [c.pk for c in cards],
            "providers": [simulator.pk, other.pk],
            "priority": 3,
            "max_concurrent_tests": 1,
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert len(body["runs"]) == 4 and body["comparison_group"]
    runs = TestRun.objects.all()
    assert {(r.card.slug, r.provider.name) for r in runs} == {
        ("one", "Test simulator"),
        ("one", "Second"),
        ("two", "Test simulator"),
        ("two", "Second"),
    }
    assert {str(r.comparison_group) for r in runs} == {body["comparison_group"]}
    assert {(r.priority, r.max_concurrent_tests) for r in runs} == {(3, 1)}
    assert [run["queue_position"] for run in body["runs"]] == [1, 2, 3, 4]


def test_a_batch_queues_all_or_nothing(api, make_card, simulator):
    good, empty = make_card("good"), make_card("empty", cases=0)
    response = api.post(
        "/api/runs/batch/",
        {"cards": [good.pk, empty.pk], "providers": [simulator.pk]},
        format="json",
    )
    assert response.status_code == 400
    assert response.json() == {"non_field_errors": ["Empty has no enabled test cases to run."]}
    too_many = api.post(
        "/api/runs/batch/", {"cards": [good.pk] * 101, "providers": [simulator.pk]}, format="json"
    )
    assert too_many.status_code == 400 and "cards" in too_many.json()
    assert not TestRun.objects.exists()


# --- Cards and providers by name -----------------------------------------------------------


def test_launch_takes_a_cards_slug_and_a_providers_name_or_their_ids(api, make_card, simulator):
    card = make_card("refund-policy")
    by_name = api.post(
        "/api/runs/", {"card": "refund-policy", "provider": "Test simulator"}, format="json"
    )
    mixed = api.post(
        "/api/runs/",
        {"card": card.pk, "provider": "Test simulator", "grader_provider": str(simulator.pk)},
        format="json",
    )
    assert by_name.status_code == mixed.status_code == 201, (by_name.json(), mixed.json())
    runs = TestRun.objects.order_by("pk")
    assert [(run.card, run.provider) for run in runs] == [(card, simulator)] * 2
    assert runs[1].grader_provider == simulator
    assert by_name.json()["card"] == {"id": card.pk, "slug": "refund-policy", "name": card.name}


def test_a_slug_wins_over_an_id_written_as_text_but_a_number_is_always_an_id(
    api, make_card, simulator
):
    first = make_card("first")
    numbered = make_card(str(first.pk))  # a card whose slug is the other one's id
    as_text = api.post(
        "/api/runs/", {"card": str(first.pk), "provider": "Test simulator"}, format="json"
    )
    as_number = api.post(
        "/api/runs/", {"card": first.pk, "provider": "Test simulator"}, format="json"
    )
    assert TestRun.objects.get(pk=as_text.json()["id"]).card == numbered
    assert TestRun.objects.get(pk=as_number.json()["id"]).card == first


def test_batch_takes_names_and_ids_mixed(api, make_card, simulator):
    one, two = make_card("one", cases=1), make_card("two", cases=1)
    other = Provider.objects.create(name="Fake OpenAI", kind="simulator", model="sim-2")
    response = api.post(
        "/api/runs/batch/",
        {
            "cards": ["one", two.pk, str(one.pk)],  # "one" twice: by slug and by id
            "providers": ["Fake OpenAI", simulator.pk],
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    assert {(run.card, run.provider) for run in TestRun.objects.all()} == {
        (one, other),
        (one, simulator),
        (two, other),
        (two, simulator),
    }
    assert len(response.json()["runs"]) == 4


def test_unknown_names_are_a_400_naming_them_with_the_nearest_names(api, make_card, simulator):
    make_card("refund-policy")
    Provider.objects.create(name="Fake OpenAI", kind="simulator", model="sim-2")
    typo = api.post(
        "/api/runs/", {"card": "refund-polcy", "provider": "fake openai"}, format="json"
    )
    assert typo.status_code == 400
    assert typo.json() == {
        "card": ["No card with the slug 'refund-polcy'. Did you mean 'refund-policy'?"],
        "provider": ["No provider named 'fake openai'. Did you mean 'Fake OpenAI'?"],
    }
    far = api.post(
        "/api/runs/",
        {"card": "zzz", "provider": 987654321, "grader_provider": "987654321"},
        format="json",
    )
    assert far.json() == {
        "card": ["No card with the slug 'zzz'."],
        "provider": ["No provider with the id 987654321."],
        "grader_provider": ["No provider with the name or id '987654321'."],
    }
    batch = api.post(
        "/api/runs/batch/",
        {"cards": ["refund-policy", "nope", "nope", "refund_policy"], "providers": [True]},
        format="json",
    )
    assert batch.status_code == 400
    assert batch.json() == {
        "cards": [
            "No card with the slug 'nope'.",
            "No card with the slug 'refund_policy'. Did you mean 'refund-policy'?",
        ],
        "providers": {"0": ["Give the provider's name (text) or its id (a number)."]},
    }
    assert not TestRun.objects.exists()


def test_lists_filter_by_a_cards_slug_and_a_providers_name(api, make_card, simulator):
    card, other = make_card("refund-policy", cases=2), make_card("other", cases=1)
    second = Provider.objects.create(name="Fake OpenAI", kind="simulator", model="sim-2")
    mine = launch(api, card, simulator).json()["id"]
    launch(api, other, second)
    ids = lambda url: [item["id"] for item in api.get(url).json()["results"]]  # noqa: E731
    assert ids("/api/runs/?card=refund-policy") == [mine]
    assert ids("/api/runs/?provider=Test%20simulator") == [mine]
    assert ids(f"/api/runs/?card={card.pk}&provider={simulator.pk}") == [mine]
    assert ids("/api/runs/?card=987654321") == []  # an id that names nothing, as ever
    unknown = api.get("/api/runs/?provider=Fake%20OpenAl")
    assert unknown.status_code == 400
    assert unknown.json() == {
        "provider": ["No provider named 'Fake OpenAl'. Did you mean 'Fake OpenAI'?"]
    }
    assert api.get("/api/cases/?card=refund-policy").json()["count"] == 2
    assert api.get("/api/cases/?card=nope").json() == {"card": ["No card with the slug 'nope'."]}


def test_the_schemas_launch_examples_are_accepted_as_they_stand(api, client, launcher):
    """The docs page's "Try it out" sends a request body example: each must queue runs on
    the demo data `make run` seeds, and none may be generated filler."""
    demo.seed_demo(max_concurrent_runs=4)
    client.force_login(launcher)
    schema = client.get("/api/schema/?format=json").json()
    for path, serializer_class in (
        ("/api/runs/", LaunchSerializer),
        ("/api/runs/batch/", BatchLaunchSerializer),
    ):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        examples = [example["value"] for example in body["examples"].values()]
        assert examples, path
        for example in examples:
            assert "9223372036854775807" not in json.dumps(example)
            checked = serializer_class(data=example)
            assert checked.is_valid(), (example, checked.errors)
            response = api.post(path, example, format="json")
            assert response.status_code == 201, (example, response.json())
    request_schema = schema["components"]["schemas"]["LaunchRequest"]["properties"]
    assert request_schema["card"]["example"] == "support-reply"
    assert {"type": "string"} in request_schema["card"]["oneOf"]


# --- Following runs -------------------------------------------------------------------------


def test_progress_shows_queue_place_counts_and_why_the_run_waits(api, make_card, simulator):
    limits.ensure_semaphores(simulator)
    limits.set_limit(gate.RUNS, 1)
    card = make_card()
    running = launch(api, card, simulator).json()["id"]
    admission.admit_runs()
    waiting = launch(api, card, simulator).json()["id"]
    progress = api.get(f"/api/runs/{waiting}/progress/").json()
    assert progress["status"] == "queued" and progress["queue_position"] == 1
    assert progress["queue_length"] == 1
    assert progress["total_cases"] == 3 and progress["done_count"] == 0
    assert progress["waiting_reasons"] == ["all 1 run slots are in use", "no worker is running"]
    started = api.get(f"/api/runs/{running}/progress/").json()
    assert started["status"] == "running" and started["queue_position"] is None
    assert started["percent_done"] == 0.0 and started["waiting_reasons"] == ["no worker is running"]


def test_results_come_in_case_order_a_page_at_a_time(api, make_card, simulator):
    run_id = launch(api, make_card(cases=5), simulator).json()["id"]
    run = TestRun.objects.get(pk=run_id)
    run.results.filter(position__in=[1, 3]).update(status="passed", output="N1 ok")
    page = api.get(f"/api/runs/{run_id}/results/?page_size=2").json()
    assert page["count"] == 5 and page["next"] and page["previous"] is None
    assert [r["case_name"] for r in page["results"]] == ["case 0", "case 1"]
    last = api.get(f"/api/runs/{run_id}/results/?page_size=2&page=3").json()
    assert [r["case_name"] for r in last["results"]] == ["case 4"]
    passed = api.get(f"/api/runs/{run_id}/results/?status=passed").json()
    assert [r["position"] for r in passed["results"]] == [1, 3]
    assert api.get(f"/api/runs/{run_id}/results/?status=nope").status_code == 400
    assert api.get(f"/api/runs/{run_id}/results/?page=99").status_code == 404


def test_active_lists_running_runs_then_waiting_ones_in_queue_order(api, make_card, simulator):
    limits.ensure_semaphores(simulator)
    limits.set_limit(gate.RUNS, 1)
    card = make_card()
    first = launch(api, card, simulator).json()["id"]
    admission.admit_runs()
    low = launch(api, card, simulator, priority=-5).json()["id"]
    high = launch(api, card, simulator, priority=5).json()["id"]
    done = launch(api, card, simulator).json()["id"]
    launching.cancel_run(TestRun.objects.get(pk=done))
    active = api.get("/api/runs/active/").json()["results"]
    assert [(r["id"], r["status"], r["queue_position"]) for r in active] == [
        (first, "running", None),
        (high, "queued", 1),
        (low, "queued", 2),
    ]


def test_run_list_is_paginated_and_filtered(api, make_card, simulator):
    card, other = make_card(), make_card("other")
    ids = [launch(api, c, simulator).json()["id"] for c in (card, other, card)]
    page = api.get("/api/runs/?page_size=2").json()
    assert page["count"] == 3 and [r["id"] for r in page["results"]] == ids[::-1][:2]
    assert [r["id"] for r in api.get(f"/api/runs/?card={other.pk}").json()["results"]] == [ids[1]]
    assert api.get("/api/runs/?status=queued").json()["count"] == 3
    assert api.get("/api/runs/?status=running").json()["count"] == 0
    for bad in ("status=done", "card=abc", "provider=-1", "card=1e3"):
        assert api.get(f"/api/runs/?{bad}").status_code == 400, bad


def test_runs_of_other_users_are_invisible_without_the_view_permission(
    api, make_card, simulator, django_user_model
):
    owner = grant(
        django_user_model.objects.create_user("owner", password="owner-password-1"),
        "launch_testrun",
    )
    theirs = launch(client_for(owner), make_card(), simulator).json()["id"]
    for url in (
        f"/api/runs/{theirs}/",
        f"/api/runs/{theirs}/progress/",
        f"/api/runs/{theirs}/results/",
        f"/api/runs/{theirs}/report/",
        f"/api/runs/{theirs}/junit/",
    ):
        assert api.get(url).status_code == 404, url
    assert api.delete(f"/api/runs/{theirs}/").status_code == 404
    assert api.get("/api/runs/").json()["count"] == 0
    assert api.get("/api/runs/active/").json()["count"] == 0
    viewer = grant(
        django_user_model.objects.create_user("vera", password="vera-password-1"), "view_testrun"
    )
    assert client_for(viewer).get(f"/api/runs/{theirs}/").status_code == 200


def test_unknown_malformed_and_huge_ids_are_404(api):
    for pk in ("999999", "abc", "9" * 40, "-1"):
        response = api.get(f"/api/runs/{pk}/")
        assert response.status_code == 404, pk
        assert "detail" in response.json()


def test_cancel_needs_the_permission_and_keeps_finished_runs_as_they_are(
    make_card, simulator, user
):
    user = grant(user, "launch_testrun")
    api = client_for(user)
    run_id = launch(api, make_card(), simulator).json()["id"]
    forbidden = api.delete(f"/api/runs/{run_id}/")
    assert forbidden.status_code == 403
    assert forbidden.json() == {"detail": "You may not cancel runs."}
    api = client_for(grant(user, "cancel_testrun"))
    cancelled = api.delete(f"/api/runs/{run_id}/")
    assert cancelled.status_code == 200
    assert cancelled.json() == {"id": run_id, "status": "cancelled", "cancelled": True}
    assert TestRun.objects.get(pk=run_id).results.filter(status="skipped").count() == 3
    again = api.delete(f"/api/runs/{run_id}/")
    assert again.status_code == 409
    assert again.json() == {"detail": f"Run #{run_id} has already finished (cancelled)."}


def test_cancelling_a_running_run_gives_its_slot_to_the_next(api, make_card, simulator):
    limits.ensure_semaphores(simulator)
    limits.set_limit(gate.RUNS, 1)
    card = make_card()
    first = launch(api, card, simulator).json()["id"]
    admission.admit_runs()
    second = launch(api, card, simulator).json()["id"]
    assert api.delete(f"/api/runs/{first}/").status_code == 200
    assert TestRun.objects.get(pk=second).status == "running"
    assert Semaphore.objects.get(name=gate.RUNS).in_use == 1


def test_report_and_junit_of_a_finished_run(api, make_card, simulator):
    run_id = launch(api, make_card(cases=3), simulator).json()["id"]
    run = TestRun.objects.get(pk=run_id)
    results = list(run.results.order_by("position"))
    results[0].status, results[0].latency_ms, results[0].output = "passed", 120, "hi N0"
    results[1].status, results[1].assertion_results = (
        "failed",
        [
            {
                "type": "contains",
                "passed": False,
                "score": 0,
                "reason": "'N1' not found",
                "weight": 1,
            }
        ],
    )
    results[2].status, results[2].error = "error", "HTTP 500: boom"
    for result in results:
        result.save()
    TestRun.objects.filter(pk=run_id).update(
        status="failed", passed_count=1, failed_count=1, error_count=1, done_count=3
    )
    report = api.get(f"/api/runs/{run_id}/report/").json()
    assert report["run"]["status"] == "failed"
    assert report["statistics"]["pass_rate"] == pytest.approx(1 / 3)
    assert [r["status"] for r in report["results"]] == ["passed", "failed", "error"]
    junit = api.get(f"/api/runs/{run_id}/junit/")
    assert junit["Content-Type"].startswith("application/xml")
    suite = ET.fromstring(junit.content).find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    failure = suite.findall("testcase")[1].find("failure")
    assert "'N1' not found" in failure.get("message")


# --- Cards, cases, versions, providers ------------------------------------------------------


def test_card_crud_follows_model_permissions_and_versions_the_prompt(editor, user, simulator):
    assert client_for(user).post("/api/cards/", {}, format="json").status_code == 403
    assert client_for(user).get("/api/cards/").status_code == 403
    api = client_for(editor)
    created = api.post(
        "/api/cards/",
        {
            "name": "Greeter",
            "slug": "greeter",
            "template": "Hi {{ name }}",
            "tags": ["smoke"],
            "change_note": "first draft",
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    card = created.json()
    assert (card["owner"], card["latest_version"], card["case_count"]) == ("eddie", 1, 0)
    assert PromptVersion.objects.get(card_id=card["id"]).change_note == "first draft"
    changed = api.patch(
        f"/api/cards/{card['id']}/",
        {"template": "Hello {{ name }}", "change_note": "warmer"},
        format="json",
    )
    assert changed.status_code == 200 and changed.json()["latest_version"] == 2
    assert PromptVersion.objects.get(card_id=card["id"], number=2).change_note == "warmer"
    unchanged = api.patch(f"/api/cards/{card['id']}/", {"description": "d"}, format="json")
    assert unchanged.json()["latest_version"] == 2
    assert api.get("/api/cards/?tag=smoke").json()["count"] == 1
    assert api.get("/api/cards/?tag=other").json()["count"] == 0
    versions = api.get(f"/api/versions/?card={card['id']}").json()["results"]
    assert [v["number"] for v in versions] == [2, 1]
    assert api.delete(f"/api/cards/{card['id']}/").status_code == 204
    assert not PromptCard.objects.exists()


def test_a_card_with_runs_cannot_be_deleted(editor, make_card, simulator):
    card = make_card()
    launching.launch_run(card=card, provider=simulator)
    response = client_for(editor).delete(f"/api/cards/{card.pk}/")
    assert response.status_code == 409
    assert "still in use" in response.json()["detail"]


def test_card_validation_is_the_models_with_its_messages(editor, make_card):
    api = client_for(editor)
    make_card("taken")
    response = api.post(
        "/api/cards/", {"name": "Bad", "slug": "taken", "template": "{% if %}"}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["slug"] == ["prompt card with this slug already exists."]
    broken = api.post(
        "/api/cards/", {"name": "Bad", "slug": "bad", "template": "{% if %}"}, format="json"
    )
    card = PromptCard(name="Bad", slug="bad", template="{% if %}")
    with pytest.raises(Exception) as model_error:
        card.full_clean()
    assert broken.json() == {"template": model_error.value.message_dict["template"]}


def test_a_baseline_must_be_a_visible_run_of_the_card(editor, make_card, simulator):
    card, other = make_card(), make_card("other")
    run = launching.launch_run(card=other, provider=simulator)
    api = client_for(grant(editor, "view_testrun"))
    refused = api.patch(f"/api/cards/{card.pk}/", {"baseline_run": run.pk}, format="json")
    assert refused.json() == {"baseline_run": ["Pick a run of this card."]}
    own = launching.launch_run(card=card, provider=simulator)
    assert (
        api.patch(f"/api/cards/{card.pk}/", {"baseline_run": own.pk}, format="json").json()[
            "baseline_run"
        ]
        == own.pk
    )


def test_test_case_validation_is_the_models(editor, make_card):
    api = client_for(editor)
    card = make_card(cases=0)
    missing = api.post(
        "/api/cases/", {"card": card.pk, "name": "x", "variables": {}}, format="json"
    )
    assert missing.json() == {"variables": ["Missing variables for the template: name."]}
    bad = api.post(
        "/api/cases/",
        {
            "card": card.pk,
            "name": "x",
            "variables": {"name": "A"},
            "assertions": [{"type": "no-such-check"}],
            "threshold": 2,
        },
        format="json",
    )
    assert set(bad.json()) == {"assertions", "threshold"}
    good = api.post(
        "/api/cases/",
        {
            "card": card.pk,
            "name": "ok",
            "variables": {"name": "A"},
            "assertions": [{"type": "contains", "value": "A"}],
            "tags": ["smoke"],
        },
        format="json",
    )
    assert good.status_code == 201, good.json()
    case_id = good.json()["id"]
    assert api.get(f"/api/cases/?card={card.pk}&tag=smoke").json()["count"] == 1
    assert api.get("/api/cases/?enabled=false").json()["count"] == 0
    assert api.patch(f"/api/cases/{case_id}/", {"variables": []}, format="json").status_code == 400
    assert api.delete(f"/api/cases/{case_id}/").status_code == 204


def test_launchers_may_read_cards_and_providers_but_not_change_them(api, make_card, simulator):
    card = make_card()
    assert api.get("/api/cards/").json()["results"][0]["slug"] == card.slug
    assert api.get(f"/api/cases/?card={card.pk}").json()["count"] == 3
    assert api.get("/api/providers/").json()["results"][0]["name"] == simulator.name
    assert api.patch(f"/api/cards/{card.pk}/", {"name": "x"}, format="json").status_code == 403
    assert api.delete(f"/api/providers/{simulator.pk}/").status_code == 403


def test_versions_are_read_only(root_api, make_card):
    card = make_card()
    version = card.versions.get()
    assert root_api.get(f"/api/versions/{version.pk}/").json()["template"] == card.template
    assert root_api.post("/api/versions/", {}, format="json").status_code == 405
    assert root_api.delete(f"/api/versions/{version.pk}/").status_code == 405


def test_providers_take_the_name_of_a_key_variable_never_a_key(editor):
    api = client_for(editor)
    base = {
        "name": "Remote",
        "kind": "openai",
        "model": "gpt",
        "base_url": "http://localhost:11434/v1",
    }
    refused = api.post("/api/providers/", base | {"api_key": "sk-secret"}, format="json")
    assert refused.status_code == 400 and "api_key" in refused.json()
    looks_like_a_key = api.post(
        "/api/providers/", base | {"api_key_env": "sk-12345"}, format="json"
    )
    assert looks_like_a_key.json()["api_key_env"][0].startswith(
        "Enter the name of an environment variable"
    )
    created = api.post("/api/providers/", base | {"api_key_env": "OPENAI_API_KEY"}, format="json")
    assert created.status_code == 201
    assert created.json()["api_key_env"] == "OPENAI_API_KEY"
    assert not {"api_key", "key"} & set(created.json())
    no_model = api.post("/api/providers/", base | {"name": "Other", "model": ""}, format="json")
    assert no_model.json() == {
        "model": [
            "A OpenAI-compatible HTTP (OpenAI, Ollama, vLLM, LM Studio, ...) provider needs a "
            "model name."
        ]
    }


def test_changing_a_providers_limit_changes_its_semaphore(editor, simulator, make_card):
    limits.ensure_semaphores(simulator)
    response = client_for(editor).patch(
        f"/api/providers/{simulator.pk}/", {"max_concurrency": 9}, format="json"
    )
    assert response.status_code == 200
    assert Semaphore.objects.get(name=gate.provider_semaphore(simulator.pk)).limit == 9


def test_command_providers_are_for_superusers_only(editor, root_api):
    api = client_for(editor)
    command = {"name": "Local", "kind": "command", "command": "cat"}
    refused = api.post("/api/providers/", command, format="json")
    assert refused.json() == {
        "kind": ["Only superusers may create or change local command providers."]
    }
    created = root_api.post("/api/providers/", command, format="json")
    assert created.status_code == 201
    provider_id = created.json()["id"]
    assert api.get(f"/api/providers/{provider_id}/").status_code == 200
    assert (
        api.patch(
            f"/api/providers/{provider_id}/", {"kind": "simulator"}, format="json"
        ).status_code
        == 403
    )
    assert api.delete(f"/api/providers/{provider_id}/").status_code == 403
    assert root_api.delete(f"/api/providers/{provider_id}/").status_code == 204


def test_cards_import_and_export_through_the_api(editor, make_card):
    api = client_for(editor)
    make_card("exported", cases=2)
    exported = api.get("/api/cards/export/?file_format=json&slug=exported")
    assert exported.status_code == 200 and exported["Content-Type"] == "application/json"
    content = exported.content.decode().replace('"exported"', '"imported"')
    imported = api.post(
        "/api/cards/import/", {"filename": "cards.json", "content": content}, format="json"
    )
    assert imported.status_code == 200, imported.json()
    assert imported.json()["cards_created"] == 1 and imported.json()["cases_created"] == 2
    broken = api.post(
        "/api/cards/import/", {"filename": "cards.yaml", "content": "cards: 3"}, format="json"
    )
    assert broken.json() == {
        "content": ["cards.yaml: cards: must be a list of cards, got a number"]
    }


def test_duplicating_a_card_needs_the_add_permission(editor, api, make_card):
    card = make_card()
    assert api.post(f"/api/cards/{card.pk}/duplicate/").status_code == 403
    copy = client_for(editor).post(f"/api/cards/{card.pk}/duplicate/")
    assert copy.status_code == 201
    assert copy.json()["slug"] == "greeting-copy" and copy.json()["case_count"] == 3


def test_lists_take_as_many_queries_for_many_rows_as_for_few(root_api, make_card, simulator):

    urls = [
        "/api/runs/",
        "/api/runs/active/",
        "/api/cards/",
        "/api/cases/",
        "/api/versions/",
        "/api/providers/",
    ]

    def counts() -> list[int]:
        numbers = []
        for url in urls:
            with CaptureQueriesContext(connection) as queries:
                assert root_api.get(url).status_code == 200
            numbers.append(len(queries))
        return numbers

    def add(n: int) -> None:
        card = make_card(f"card-{PromptCard.objects.count()}", cases=2)
        Provider.objects.create(name=f"p{Provider.objects.count()}", kind="simulator", model="s")
        for _ in range(n):
            launching.launch_run(card=card, provider=simulator)

    add(1)
    few = counts()
    for _ in range(4):
        add(3)
    assert counts() == few
