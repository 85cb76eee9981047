from __future__ import annotations

import pytest
from django.urls import reverse

from testruns.models import TestRun

pytestmark = pytest.mark.django_db


def test_every_page_requires_login(client):
    for name in ["dashboard", "launch"]:
        response = client.get(reverse(name))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))


def test_login_page_logs_in(client, user):
    response = client.post(reverse("login"),
                           {"username": "alice", "password": "alice-password-1"})
    assert response.status_code == 302
    assert client.get(reverse("dashboard")).status_code == 200


def test_launch_page_queues_a_run_and_leads_to_its_page(client, launcher, make_card, simulator):
    card = make_card(cases=2)
    client.force_login(launcher)
    response = client.post(reverse("launch"),
                           {"card": card.pk, "provider": simulator.pk, "priority": 5})
    run = TestRun.objects.get()
    assert response.status_code == 302 and response["Location"] == run.get_absolute_url()
    assert (run.status, run.priority, run.total_cases, run.launched_by) == (
        "queued", 5, 2, launcher)
    assert run.results.count() == 2
    page = client.get(run.get_absolute_url())
    assert page.status_code == 200 and f"/ws/runs/{run.pk}/" in page.content.decode()


def test_launch_without_permission_is_forbidden_and_hidden(client, user, make_card, simulator):
    client.force_login(user)
    assert client.get(reverse("launch")).status_code == 403
    assert reverse("launch") not in client.get(reverse("dashboard")).content.decode()


def test_launch_of_a_card_without_cases_explains_why(client, launcher, make_card, simulator):
    card = make_card(cases=0)
    client.force_login(launcher)
    response = client.post(reverse("launch"), {"card": card.pk, "provider": simulator.pk,
                                                "priority": 0})
    assert response.status_code == 200
    assert "has no enabled test cases" in response.content.decode()
    assert not TestRun.objects.exists()


def test_status_json_is_private_to_those_who_may_see_the_run(
    client, launcher, django_user_model, make_card, simulator
):
    client.force_login(launcher)
    client.post(reverse("launch"), {"card": make_card().pk, "provider": simulator.pk,
                                    "priority": 0})
    run = TestRun.objects.get()
    snapshot = client.get(reverse("run-status", args=[run.pk])).json()
    assert snapshot["run"]["status"] == "queued" and snapshot["run"]["queue_position"] == 1

    other = django_user_model.objects.create_user("bob", password="bob-password-1")
    client.force_login(other)
    assert client.get(reverse("run-status", args=[run.pk])).status_code == 404
    assert client.get(run.get_absolute_url()).status_code == 404
