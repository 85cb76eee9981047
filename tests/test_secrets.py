"""A provider's API key is read from the environment when a call is made, and appears in no
page, no log line and no database column."""

from __future__ import annotations

import logging

import pytest
from django.db import connection
from django.urls import reverse

from testruns.engine import admission, execution, launching, providers
from testruns.models import Provider, TestResult
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.django_db

SECRET = "sk-test-51Hc0nf1dent1alKeyValue"


@pytest.fixture
def keyed_provider(fake_llm, monkeypatch):
    monkeypatch.setenv("PCR_TEST_OPENAI_KEY", SECRET)
    return Provider.objects.create(
        name="Keyed",
        kind="openai",
        model="m",
        base_url=fake_llm.base_url,
        api_key_env="PCR_TEST_OPENAI_KEY",
    )


def every_text_in_the_database() -> str:
    chunks = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT t::text FROM "{table}" t')
            chunks += [row[0] for row in cursor.fetchall()]
    return "\n".join(chunks)


def test_api_key_is_used_but_never_shown_logged_or_stored(
    client, django_user_model, keyed_provider, fake_llm, make_card, caplog
):
    caplog.set_level(logging.DEBUG)
    admin = django_user_model.objects.create_superuser("root", password="root-password-1")
    client.force_login(admin)

    answer = client.post(
        reverse("admin:testruns_provider_changelist"),
        {"action": "test_connection", "_selected_action": [keyed_provider.pk]},
        follow=True,
    )
    assert "answered" in answer.content.decode()
    assert fake_llm.requests[-1].headers["authorization"] == f"Bearer {SECRET}"

    # A whole case through the engine, including a failing call whose error is recorded.
    run = launching.launch_run(card=make_card(cases=1), provider=keyed_provider)
    admission.admit_runs()
    admission.admit_cases(keyed_provider.pk)
    fake_llm.reply_with(
        lambda prompt: FakeReply(status=401, body={"error": {"message": f"bad key {SECRET}"}})
    )
    execution.run_admitted_case(TestResult.objects.get(run=run).pk, "test-holder")
    assert "HTTP 401" in TestResult.objects.get(run=run).error

    pages = [answer] + [
        client.get(url)
        for url in (
            reverse("admin:testruns_provider_changelist"),
            reverse("admin:testruns_provider_change", args=[keyed_provider.pk]),
            reverse("admin:testruns_testrun_change", args=[run.pk]),
            reverse("run-detail", args=[run.pk]),
            reverse("run-status", args=[run.pk]),
        )
    ]
    for page in pages:
        assert page.status_code == 200
        assert SECRET not in page.content.decode()
    assert "PCR_TEST_OPENAI_KEY" in pages[2].content.decode()  # the name is fine to show
    assert SECRET not in caplog.text
    assert SECRET not in every_text_in_the_database()


def test_a_missing_key_variable_is_named_in_the_error(keyed_provider, monkeypatch):

    monkeypatch.delenv("PCR_TEST_OPENAI_KEY")
    with pytest.raises(providers.ProviderError, match="PCR_TEST_OPENAI_KEY"):
        providers.test_connection(keyed_provider)
