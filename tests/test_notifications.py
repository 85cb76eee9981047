"""Notifications: a finished run's notices go out once per rule, say what changed (cases that
regressed, pass rate before and after, cost) and link to the report; a webhook is signed with
its endpoint's secret (an environment variable's name, never stored), retried with backoff
through Dramatiq by a real worker, and every attempt is in the delivery log; Slack-compatible
and e-mail notices for a regression. The receivers are real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.core.exceptions import ValidationError

from testruns.engine import launching, settling
from testruns.models import (
    MetricCounter,
    NotificationDelivery,
    NotificationRule,
    Provider,
    TestCase,
    TestRun,
)
from testruns.notify import delivering
from tests.conftest import run_in_this_thread, wait_for

SECRET_ENV = "PCR_TEST_HOOK_KEY"
SECRET = "s3cret-shared-with-the-receiver"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that answers POSTs with the statuses scripted, then 200."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else 200


@pytest.fixture
def receiver():
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = state.answer()
            with state.lock:
                state.requests.append(Received(self.path, dict(self.headers), body))
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if status == 200 else b"receiver is down")

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/pcr"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def counter(name: str, **labels) -> float:
    row = MetricCounter.objects.filter(name=name, labels=labels).first()
    return row.value if row else 0


def rule_for(card, **fields) -> NotificationRule:
    rule = NotificationRule(name=fields.pop("name", "team"), card=card, **fields)
    rule.full_clean()
    rule.save()
    return rule


@pytest.fixture
def priced_simulator(simulator) -> Provider:
    Provider.objects.filter(pk=simulator.pk).update(
        price_input_per_mtok=1000, price_output_per_mtok=2000
    )
    simulator.refresh_from_db()
    return simulator


@pytest.fixture
def regression(make_card, priced_simulator):
    """A card whose second run fails the case that passed in the first (its baseline), each
    run asking 10 times per case: 10 of 10 passes falling to none is a regression that chance
    does not explain (one pass turning into one failure would be too little evidence)."""
    card = make_card(cases=3)
    run_in_this_thread(launching.launch_run(card=card, provider=priced_simulator, repeats=10))
    TestCase.objects.filter(card=card, name="case 1").update(
        assertions=[{"type": "contains", "value": "never in the answer"}]
    )
    return card


def run_again(card, provider) -> TestRun:
    run = run_in_this_thread(launching.launch_run(card=card, provider=provider, repeats=10))
    assert run.status == "failed"
    return run


# --- Rules ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_rule_refuses_app_settings_as_secrets_and_metadata_urls(make_card):
    card = make_card()
    cases = [
        ({"secret_env": "SECRET_KEY"}, "secret_env", "one of this app's own settings"),
        ({"secret_env": "DATABASE_URL"}, "secret_env", "one of this app's own settings"),
        ({"secret_env": "s3cr3t value"}, "secret_env", "not the secret itself"),
        ({"secret_env": ""}, "secret_env", "A webhook is signed"),
        ({"url": "http://169.254.169.254/latest/"}, "url", "cloud metadata address"),
    ]
    for fields, where, message in cases:
        rule = NotificationRule(
            name="x", card=card, url="http://127.0.0.1:9/", secret_env=SECRET_ENV
        )
        for name, value in fields.items():
            setattr(rule, name, value)
        with pytest.raises(ValidationError) as caught:
            rule.full_clean()
        assert message in " ".join(caught.value.message_dict[where]), fields
    email = NotificationRule(name="x", card=card, channel="email", recipients="ops@, x")
    with pytest.raises(ValidationError, match="not an e-mail address"):
        email.full_clean()


# --- Webhook, through a real worker ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_webhook_is_signed_retried_after_a_500_and_both_attempts_are_logged(
    worker_factory, receiver, make_card, simulator
):
    card = make_card(cases=2)
    rule = rule_for(card, url=receiver.url, secret_env=SECRET_ENV, on_finish=True)
    receiver.statuses = [500]
    worker_factory(
        processes=1,
        threads=2,
        env={SECRET_ENV: SECRET, "NOTIFY_RETRY_BASE_SECONDS": "0.2"},
    )
    run = launching.launch_run(card=card, provider=simulator)

    delivery = wait_for(
        lambda: NotificationDelivery.objects.filter(rule=rule, run=run, status="sent").first(),
        timeout=60,
        what="the notification to be delivered",
    )
    assert len(receiver.requests) == 2  # the 500, then the retry that got through
    for request in receiver.requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers["X-PCR-Signature"], expected)
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["X-PCR-Delivery"] == str(delivery.pk)
    first, second = receiver.requests
    assert first.body == second.body  # a retry sends the same notice
    notice = json.loads(first.body)
    assert notice["event"] == "finish" and notice["run"]["id"] == run.pk
    assert notice["run"]["url"].endswith(f"/runs/{run.pk}/report/")
    assert notice["run"]["status"] == "succeeded" and notice["run"]["pass_rate"] == 1.0

    attempts = list(delivery.attempt_log.order_by("number"))
    assert [(a.number, a.ok, a.status_code) for a in attempts] == [(1, False, 500), (2, True, 200)]
    assert "HTTP 500" in attempts[0].error
    assert (delivery.attempts, delivery.status) == (2, "sent")
    assert counter("notifications_sent", channel="webhook") == 1
    assert counter("notification_attempts_failed", channel="webhook") == 1
    assert TestRun.objects.get(pk=run.pk).status == "succeeded"
    # The secret is not in the database: not in the rule, the delivery or its log.
    for text in (str(NotificationRule.objects.filter(pk=rule.pk).values().get()),):
        assert SECRET not in text
    assert SECRET not in json.dumps(delivery.payload) + delivery.last_error


# --- Regressions: Slack and e-mail ----------------------------------------------------------


@pytest.mark.django_db
def test_a_slack_notice_names_the_regressed_case_and_the_pass_rates(
    receiver, regression, priced_simulator, settings
):
    settings.SITE_URL = "https://cards.example.com"
    rule = rule_for(regression, channel="slack", url=receiver.url)
    run = run_again(regression, priced_simulator)
    delivery = NotificationDelivery.objects.get(rule=rule, run=run)  # created as it finished

    assert delivering.deliver(delivery.pk) == "sent"
    (request,) = receiver.requests
    assert "X-PCR-Signature" not in request.headers
    body = json.loads(request.body)
    report = f"https://cards.example.com/runs/{run.pk}/report/"
    assert body["text"] == (
        f"Regression: Greeting on Test simulator (run #{run.pk}, failed): 1 case regressed; "
        f"pass rate 100% → 67% <{report}|Report>"
    )
    (block,) = body["blocks"]
    lines = block["text"]["text"].splitlines()
    assert lines[1] == "Regressed: case 1"
    assert lines[2].startswith("Cost: $") and "(baseline $" in lines[2]
    assert lines[-1] == f"<{report}|Open the report>"
    assert delivering.deliver(delivery.pk) is None  # sent once


@pytest.mark.django_db
def test_a_slack_url_can_stay_in_the_environment_and_out_of_the_database(
    receiver, regression, priced_simulator, monkeypatch, client, admin_user
):
    """An incoming-webhook URL is a secret: named by its variable, it is read on the worker,
    never stored, and never repeated in the delivery log when the post fails."""
    rule = rule_for(regression, channel="slack", secret_env="TEAM_SLACK_TOKEN")
    run = run_again(regression, priced_simulator)
    delivery = NotificationDelivery.objects.get(rule=rule, run=run)

    assert delivering.deliver(delivery.pk) == "retrying"  # not set on this worker yet
    delivery.refresh_from_db()
    assert delivery.last_error == "the variable TEAM_SLACK_TOKEN is not set on this worker"

    monkeypatch.setenv("TEAM_SLACK_TOKEN", receiver.url)
    assert delivering.deliver(delivery.pk) == "sent"
    assert json.loads(receiver.requests[0].body)["text"].startswith("Regression: Greeting")
    client.force_login(admin_user)
    stored = json.dumps(list(NotificationRule.objects.values()), default=str) + json.dumps(
        list(NotificationDelivery.objects.values("payload", "last_error")), default=str
    )
    page = client.get(f"/admin/testruns/notificationrule/{rule.pk}/change/").content.decode()
    assert receiver.url not in stored and receiver.url not in page


@pytest.mark.django_db
def test_an_email_notice_of_a_regression_goes_through_djangos_mail(
    regression, priced_simulator, settings
):
    settings.SITE_URL = "https://cards.example.com"
    rule = rule_for(regression, channel="email", recipients="ops@example.com, qa@example.com")
    run = run_again(regression, priced_simulator)
    delivery = NotificationDelivery.objects.get(rule=rule, run=run)

    assert delivering.deliver(delivery.pk) == "sent"
    (message,) = mail.outbox
    assert message.to == ["ops@example.com", "qa@example.com"]
    assert message.subject.startswith("[Prompt Card Runner] Regression: Greeting on Test")
    assert "1 case regressed; pass rate 100% → 67%" in message.body
    assert "Regressed: case 1\n" in message.body
    assert f"Report: https://cards.example.com/runs/{run.pk}/report/" in message.body
    assert counter("notifications_sent", channel="email") == 1


@pytest.mark.django_db
def test_one_pass_turning_into_one_failure_is_no_regression_to_notify(
    receiver, make_card, simulator
):
    """The notices use the verdict that knows noise (reporting.verdicts): with one answer per
    case, a case that passed and now fails is too little evidence to call a regression."""
    card = make_card(cases=3)
    run_in_this_thread(launching.launch_run(card=card, provider=simulator))
    TestCase.objects.filter(card=card, name="case 1").update(
        assertions=[{"type": "contains", "value": "never in the answer"}]
    )
    rule = rule_for(card, channel="slack", url=receiver.url, on_failure=False, on_error=False)
    run = run_again_once(card, simulator)
    delivery = NotificationDelivery.objects.get(rule=rule, run=run)

    assert delivering.deliver(delivery.pk) == "skipped"
    assert receiver.requests == []


def run_again_once(card, provider) -> TestRun:
    run = run_in_this_thread(launching.launch_run(card=card, provider=provider))
    assert run.status == "failed"
    return run


@pytest.mark.django_db
def test_a_run_that_meets_none_of_the_rules_events_sends_nothing(receiver, make_card, simulator):
    card = make_card(cases=1)
    rule = rule_for(card, channel="slack", url=receiver.url)  # regressions, failures, errors
    run = run_in_this_thread(launching.launch_run(card=card, provider=simulator))
    delivery = NotificationDelivery.objects.get(rule=rule, run=run)
    assert delivering.deliver(delivery.pk) == "skipped"
    assert receiver.requests == []
    delivery.refresh_from_db()
    assert delivery.events == [] and delivery.attempt_log.count() == 0


@pytest.mark.django_db
def test_a_receiver_that_keeps_failing_ends_failed_after_the_last_attempt(
    receiver, make_card, simulator, settings
):
    settings.NOTIFY_MAX_ATTEMPTS = 2
    card = make_card(cases=1)
    rule = rule_for(card, channel="slack", url=receiver.url, on_finish=True)
    receiver.statuses = [503, 502]
    run = run_in_this_thread(launching.launch_run(card=card, provider=simulator))
    delivery = NotificationDelivery.objects.get(rule=rule, run=run)

    assert delivering.deliver(delivery.pk) == "retrying"
    delivery.refresh_from_db()
    assert delivery.next_attempt_at > delivery.created_at and delivery.dispatched_at is None
    assert delivering.deliver(delivery.pk) == "failed"
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("failed", 2)
    assert "HTTP 502" in delivery.last_error
    assert counter("notifications_failed", channel="slack") == 1
    assert counter("notification_attempts_failed", channel="slack") == 2
    assert TestRun.objects.get(pk=run.pk).status == "succeeded"  # a notice never fails a run


@pytest.mark.django_db
def test_a_run_is_settled_once_however_often_it_is_asked(receiver, make_card, simulator):
    card = make_card(cases=1)
    rule_for(card, channel="slack", url=receiver.url, on_finish=True)
    rule_for(card, name="second", channel="slack", url=receiver.url, on_finish=True)
    run = run_in_this_thread(launching.launch_run(card=card, provider=simulator))
    assert TestRun.objects.get(pk=run.pk).settled_at is not None  # by its follow-up
    assert not settling.settle_run(run.pk)
    assert settling.settle_finished_runs() == 0
    assert NotificationDelivery.objects.filter(run=run).count() == 2
    assert counter("runs", status="succeeded") == 1


@pytest.mark.django_db
def test_the_delivery_log_in_the_admin_shows_each_attempt_read_only_and_never_the_secret(
    admin_client, receiver, make_card, simulator, monkeypatch
):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    card = make_card(cases=1)
    rule = rule_for(card, url=receiver.url, secret_env=SECRET_ENV, on_finish=True)
    receiver.statuses = [500]
    run = run_in_this_thread(launching.launch_run(card=card, provider=simulator))
    delivery = NotificationDelivery.objects.get(rule=rule, run=run)
    assert delivering.deliver(delivery.pk) == "retrying"
    assert delivering.deliver(delivery.pk) == "sent"

    page = admin_client.get(f"/admin/testruns/notificationdelivery/{delivery.pk}/change/")
    html = page.content.decode()
    assert page.status_code == 200
    assert "HTTP 500 Internal Server Error" in html and "receiver is down" in html
    assert html.count('<td class="field-number">') == 2  # both attempts, as rows
    assert 'name="_save"' not in html  # read-only
    assert (
        SECRET not in html
        and SECRET_ENV
        in admin_client.get(f"/admin/testruns/notificationrule/{rule.pk}/change/").content.decode()
    )
    assert admin_client.get("/admin/testruns/notificationdelivery/add/").status_code == 403
    listing = admin_client.get("/admin/testruns/notificationdelivery/").content.decode()
    assert "sent" in listing and f"#{run.pk}" in listing
