"""Secrets stay put: a provider's api_key_env may name a vendor key, never one of the app's own
settings (for superusers too), its base URL may not be a cloud metadata service, and "Test
connection" is only for those who may change the provider. Against the real database; the only
fake is the LLM vendor, over real HTTP."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from testruns.catalog import provider_rules
from testruns.engine import admission, execution, launching
from testruns.models import Provider, TestResult

ROOT = Path(__file__).resolve().parent.parent
# The code that reads the app's own configuration from the environment; a new file here is
# scanned too.
CONFIG_SOURCES = sorted([*ROOT.glob("project/*.py"), ROOT / "manage.py"])
ENV_RECEIVERS = {"environ", "env"}  # os.environ, and stack.py's copy of it


def _is_environment(node: ast.expr) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in ENV_RECEIVERS
    return isinstance(node, ast.Name) and node.id in ENV_RECEIVERS


def _constant(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def names_read_from_environment(path: Path) -> set[str]:
    """Every literal name in os.environ[...], os.environ.get/setdefault/pop(...), os.getenv(...),
    env_bool/env_int/env_float/env_list(...) and stack.py's env.get(...)/env[...]."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Subscript) and _is_environment(node.value):
            name = _constant(node.slice)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            is_reader = (
                isinstance(func, ast.Attribute)
                and (
                    (func.attr in {"get", "setdefault", "pop"} and _is_environment(func.value))
                    or func.attr == "getenv"
                )
            ) or (isinstance(func, ast.Name) and func.id.startswith("env_"))
            name = _constant(node.args[0]) if is_reader else None
        else:
            continue
        if name:
            names.add(name)
    return names


APP_NAMES = sorted(set().union(*(names_read_from_environment(path) for path in CONFIG_SOURCES)))

METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.170.2/v2/credentials",
    "http://169.254.10.20:8080/v1",
    "http://[fd00:ec2::254]/latest/",
    "http://[fe80::1]:8000/v1",
    "http://[::ffff:169.254.169.254]/",
    "http://100.100.100.200/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.google.internal./computeMetadata/v1/",
]
LOCAL_URLS = [
    "http://localhost:11434/v1",
    "http://127.0.0.1:8000/v1",
    "http://[::1]:8000/v1",
    "http://10.0.0.5:8000/v1",
    "http://192.168.1.20:1234/v1",
    "http://172.16.0.9/v1",
    "https://api.openai.com/v1",
]


def api_client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", password="root-password-1")


@pytest.fixture
def root_client(superuser) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


def provider_form(**fields) -> dict:
    return {
        "name": "Mine",
        "kind": "openai",
        "model": "gpt",
        "base_url": "",
        "api_key_env": "",
        "command": "",
        "parameters": "{}",
        "max_concurrency": "4",
        "price_input_per_mtok": "0",
        "price_output_per_mtok": "0",
        "timeout_seconds": "30",
        "enabled": "on",
    } | fields


def api_body(**fields) -> dict:
    return {
        "name": "Mine",
        "kind": "openai",
        "model": "gpt",
        "base_url": "http://localhost:11434/v1",
    } | fields


# --- Which names api_key_env may take -------------------------------------------------------


def test_the_scan_finds_the_settings_it_must():
    # Guards the scanner itself: if it found nothing, every test below would pass vacuously.
    assert {
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "METRICS_TOKEN",
        "DEBUG",
        "EMBEDDED_PG_PORT",
        "DJANGO_SETTINGS_MODULE",
        "PROVIDER_KEY_ENV_PATTERN",
    } <= set(APP_NAMES)


@pytest.mark.parametrize("name", APP_NAMES)
def test_every_name_the_app_reads_is_reserved(name, settings):
    # Whatever the operator widens the pattern to, the app's own settings stay refused.
    assert provider_rules.is_reserved_name(name), (
        f"{name} is read by the app; add it to provider_rules.RESERVED_NAMES"
    )
    settings.PROVIDER_KEY_ENV_PATTERN = r".*"
    with pytest.raises(ValidationError, match="never sent to a provider"):
        provider_rules.check_key_env_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "OPENROUTER_KEY",
        "HF_TOKEN",
        "PCR_TEST_OPENAI_KEY",
        "",
    ],
)
def test_vendor_key_names_are_accepted(name):
    provider_rules.check_key_env_name(name)


@pytest.mark.parametrize(
    "name", ["PATH", "HOME", "OPENAI_SECRET", "openai_api_key", "OPENAI_API_KEY_FILE", "_KEY"]
)
def test_other_names_are_refused_naming_the_rule_and_how_to_widen_it(name):
    with pytest.raises(ValidationError) as refused:
        provider_rules.check_key_env_name(name)
    message = refused.value.messages[0]
    assert "PROVIDER_KEY_ENV_PATTERN" in message and "_API_KEY, _KEY or _TOKEN" in message
    assert "set PROVIDER_KEY_ENV_PATTERN in the environment" in message


def test_a_widened_pattern_allows_more_names_but_never_the_reserved(settings):
    settings.PROVIDER_KEY_ENV_PATTERN = r"^[A-Z][A-Z0-9_]*$"
    provider_rules.check_key_env_name("OLLAMA_SECRET")
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "DJANGO_ANYTHING",
        "EMBEDDED_X",
        "TEST_OUTPUT_DIR",
        "dramatiq_worker_timeout",
    ):
        with pytest.raises(ValidationError):
            provider_rules.check_key_env_name(name)


@pytest.mark.django_db
@pytest.mark.parametrize("name", APP_NAMES)
def test_admin_refuses_every_app_setting_for_a_superuser(root_client, name):
    response = root_client.post(
        reverse("admin:testruns_provider_add"), provider_form(api_key_env=name)
    )
    assert response.status_code == 200
    assert "is never sent to a provider" in response.content.decode()
    assert not Provider.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("name", APP_NAMES)
def test_api_refuses_every_app_setting_for_a_superuser(superuser, name):
    response = api_client_for(superuser).post(
        "/api/providers/", api_body(api_key_env=name), format="json"
    )
    assert response.status_code == 400, response.content
    assert "is never sent to a provider" in response.json()["api_key_env"][0]
    assert not Provider.objects.exists()


@pytest.mark.django_db
def test_admin_and_api_say_how_to_widen_the_pattern(root_client, superuser):
    page = root_client.post(
        reverse("admin:testruns_provider_add"), provider_form(api_key_env="OPENAI_SECRET")
    ).content.decode()
    assert "does not match PROVIDER_KEY_ENV_PATTERN" in page
    api = api_client_for(superuser).post(
        "/api/providers/", api_body(api_key_env="HOME"), format="json"
    )
    assert api.status_code == 400
    assert "set PROVIDER_KEY_ENV_PATTERN" in api.json()["api_key_env"][0]
    created = api_client_for(superuser).post(
        "/api/providers/", api_body(api_key_env="OPENAI_API_KEY"), format="json"
    )
    assert created.status_code == 201


@pytest.mark.django_db
def test_a_changed_provider_cannot_switch_to_an_app_setting(root_client):
    provider = Provider.objects.create(
        name="Mine", kind="openai", model="gpt", api_key_env="OPENAI_API_KEY"
    )
    response = root_client.post(
        reverse("admin:testruns_provider_change", args=[provider.pk]),
        provider_form(api_key_env="REDIS_URL"),
    )
    assert response.status_code == 200 and "is never sent to a provider" in (
        response.content.decode()
    )
    provider.refresh_from_db()
    assert provider.api_key_env == "OPENAI_API_KEY"


# --- Rows saved before the rule: the call-time check ------------------------------------------


@pytest.fixture
def forced_provider(fake_llm):
    """A provider row that names an app setting, written past validation (as a row saved
    before the rule existed would be)."""
    provider = Provider.objects.create(
        name="Old",
        kind="openai",
        model="m",
        base_url=fake_llm.base_url,
        api_key_env="OPENAI_API_KEY",
    )

    def force(name: str) -> Provider:
        Provider.objects.filter(pk=provider.pk).update(api_key_env=name)
        provider.refresh_from_db()
        return provider

    return force


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["DATABASE_URL", "REDIS_URL", "SECRET_KEY", "METRICS_TOKEN"])
def test_a_run_never_sends_an_app_setting_to_the_vendor(
    forced_provider, fake_llm, make_card, monkeypatch, name
):
    # NEEDS providers.keys.api_key to call provider_rules.check_key_env_name (see the module doc).
    value = os.environ.get(name) or f"value-of-{name}-that-must-stay-put"
    monkeypatch.setenv(name, value)
    provider = forced_provider(name)
    run = launching.launch_run(card=make_card(cases=1), provider=provider)
    admission.admit_runs()
    admission.admit_cases(provider.pk)
    execution.run_admitted_case(TestResult.objects.get(run=run).pk, "test-holder")

    for request in fake_llm.requests:
        assert value not in " ".join(request.headers.values())
        assert value not in str(request.body)
    assert fake_llm.request_count == 0  # refused before any request is made
    result = TestResult.objects.get(run=run)
    assert result.status != TestResult.Status.PASSED
    assert name in result.error and value not in result.error


@pytest.mark.django_db
def test_test_connection_never_sends_an_app_setting_to_the_vendor(
    forced_provider, fake_llm, root_client
):
    provider = forced_provider("DATABASE_URL")
    page = root_client.post(
        reverse("admin:testruns_provider_changelist"),
        {"action": "test_connection", "_selected_action": [provider.pk]},
        follow=True,
    ).content.decode()
    assert fake_llm.request_count == 0
    assert "failed" in page and os.environ["DATABASE_URL"] not in page


# --- Base URLs: no cloud metadata service -----------------------------------------------------


@pytest.mark.parametrize("url", METADATA_URLS)
def test_metadata_addresses_are_refused(url):
    with pytest.raises(ValidationError, match="cloud metadata address"):
        provider_rules.check_base_url(url)


@pytest.mark.parametrize("url", LOCAL_URLS)
def test_loopback_private_and_public_servers_are_allowed(url):
    provider_rules.check_base_url(url, resolve=False)


def test_localhost_is_resolved_and_allowed():
    provider_rules.check_base_url("http://localhost:11434/v1")


@pytest.mark.parametrize("host", ["2852039166", "0xa9.0xfe.0xa9.0xfe", "169.254.43518"])
def test_a_name_that_resolves_to_a_metadata_address_is_refused(host):
    # The resolver turns these spellings into 169.254.169.254 without asking DNS.
    with pytest.raises(ValidationError, match=r"cloud metadata address"):
        provider_rules.check_base_url(f"http://{host}/latest/meta-data/")


def test_a_name_that_does_not_resolve_is_not_refused():
    # .invalid never resolves (RFC 2606), as an ordinary name does not when DNS is down.
    provider_rules.check_base_url("http://llm.example.invalid/v1")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/",
        "http://[fd00:ec2::254]/",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
def test_admin_and_api_refuse_a_metadata_base_url(root_client, superuser, url):
    page = root_client.post(
        reverse("admin:testruns_provider_add"), provider_form(base_url=url)
    ).content.decode()
    assert "cloud metadata address" in page
    response = api_client_for(superuser).post(
        "/api/providers/", api_body(base_url=url), format="json"
    )
    assert response.status_code == 400
    assert "cloud metadata address" in response.json()["base_url"][0]
    assert not Provider.objects.exists()


@pytest.mark.django_db
def test_admin_accepts_a_local_model_server(root_client):
    response = root_client.post(
        reverse("admin:testruns_provider_add"),
        provider_form(base_url="http://127.0.0.1:11434/v1", api_key_env="OLLAMA_API_KEY"),
    )
    assert response.status_code == 302
    assert Provider.objects.get().base_url == "http://127.0.0.1:11434/v1"


# --- Test connection needs change_provider ---------------------------------------------------


def staff_with(django_user_model, *codenames: str) -> Client:
    staff = django_user_model.objects.create_user("staff", password="staff-pw-1", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="testruns", codename__in=codenames)
    )
    client = Client()
    client.force_login(staff)
    return client


def press_test_connection(client: Client, provider: Provider):
    return client.post(
        reverse("admin:testruns_provider_changelist"),
        {"action": "test_connection", "_selected_action": [provider.pk]},
        follow=True,
    )


@pytest.fixture
def keyed_provider(fake_llm, monkeypatch):
    monkeypatch.setenv("PCR_TEST_OPENAI_KEY", "sk-test-connection-key")
    return Provider.objects.create(
        name="Keyed",
        kind="openai",
        model="m",
        base_url=fake_llm.base_url,
        api_key_env="PCR_TEST_OPENAI_KEY",
    )


@pytest.mark.django_db
def test_test_connection_is_refused_without_change_permission(
    django_user_model, keyed_provider, fake_llm
):
    viewer = staff_with(django_user_model, "view_provider")
    changelist = viewer.get(reverse("admin:testruns_provider_changelist")).content.decode()
    assert "test_connection" not in changelist
    response = press_test_connection(viewer, keyed_provider)
    assert response.status_code == 200 and "answered" not in response.content.decode()
    assert fake_llm.request_count == 0


@pytest.mark.django_db
def test_test_connection_works_with_change_permission(django_user_model, keyed_provider, fake_llm):
    editor = staff_with(django_user_model, "view_provider", "change_provider")
    response = press_test_connection(editor, keyed_provider)
    assert "answered" in response.content.decode()
    assert fake_llm.request_count == 1
    assert fake_llm.requests[0].headers["authorization"] == "Bearer sk-test-connection-key"


@pytest.mark.django_db
def test_test_connection_of_a_command_provider_is_for_superusers(
    django_user_model, root_client, tmp_path
):
    # Staff may change other providers but not a local command, so they may not run it either.
    marker = tmp_path / "ran"
    provider = Provider.objects.create(
        name="cmd", kind="command", command=f"/usr/bin/touch {marker}"
    )
    editor = staff_with(django_user_model, "view_provider", "change_provider")
    assert "may not test it" in press_test_connection(editor, provider).content.decode()
    assert not marker.exists()
    assert "answered" in press_test_connection(root_client, provider).content.decode()
    assert marker.exists()
