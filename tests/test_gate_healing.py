"""Slot counters stay the gate's and heal: a drifted `in_use` is corrected, logged and counted
in /metrics; a limit edited in the admin leaves `in_use` alone; leases cannot be deleted
behind the gate's back; and a worker never keeps the leases of an earlier process that had
its host name and pid."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys

import pytest
from django.contrib.admin.sites import site
from django.db import connection
from django.db.models.deletion import ProtectedError
from django.test import RequestFactory
from rest_framework.test import APIClient

from testruns.engine import admission, gate, launching, limits, sweeper
from testruns.models import Lease, Provider, Semaphore, TestRun, WorkerHeartbeat
from tests.conftest import ROOT, ChildProcess, wait_for


@pytest.fixture
def slow_provider(db):
    return Provider.objects.create(
        name="Slow sim",
        kind=Provider.Kind.SIMULATOR,
        model="sim",
        max_concurrency=2,
        parameters={"latency_ms": 50},
    )


def semaphore(name: str) -> Semaphore:
    return Semaphore.objects.get(name=name)


def lease_count(name: str) -> int:
    return Lease.objects.filter(semaphore__name=name).count()


def started_run(card, provider, **config) -> TestRun:
    run = launching.launch_run(card=card, provider=provider, **config)
    admission.admit_runs()  # what launch's on_commit does
    run.refresh_from_db()
    assert run.status == TestRun.Status.RUNNING
    return run


def test_drifted_in_use_is_corrected_logged_and_counted_in_metrics(
    make_card, slow_provider, client, caplog
):
    run = started_run(make_card(), slow_provider)
    provider_name = gate.provider_semaphore(slow_provider.pk)
    admission.admit_cases(slow_provider.pk)
    assert lease_count(provider_name) == 2
    with connection.cursor() as cursor:  # a lease lost and a counter bumped behind the gate
        cursor.execute("UPDATE testruns_semaphore SET in_use = 7 WHERE name = %s", [gate.RUNS])
        cursor.execute(
            "DELETE FROM testruns_lease WHERE id = %s",
            [Lease.objects.filter(semaphore__name=provider_name).first().pk],
        )

    with caplog.at_level(logging.WARNING, logger="testruns.engine.gate"):
        report = sweeper.sweep()

    assert report["recounted"] == 2
    assert semaphore(gate.RUNS).in_use == lease_count(gate.RUNS) == 1
    # The freed call slot went to the run's next pending case in the same sweep.
    assert semaphore(provider_name).in_use == lease_count(provider_name) == 2
    assert "semaphore runs: in_use was 7 but 1 lease(s) exist; corrected" in caplog.text
    assert f"semaphore {provider_name}: in_use was 2 but 1 lease(s) exist" in caplog.text
    metrics = client.get("/metrics").content.decode()
    assert 'pcr_semaphore_corrections_total{semaphore="runs"} 1.0' in metrics
    assert sweeper.sweep()["recounted"] == 0  # nothing left to correct
    assert run.pk


def test_an_admin_limit_edit_writes_only_the_limit(make_card, slow_provider, admin_user):
    limits.ensure_semaphores(slow_provider)
    limits.set_limit(gate.RUNS, 1)
    started_run(make_card("one"), slow_provider)
    stale = semaphore(gate.RUNS)  # what the admin's form was built from
    launching.launch_run(card=make_card("two"), provider=slow_provider)
    limits.set_limit(gate.RUNS, 2)  # a worker admits the second run meanwhile
    assert semaphore(gate.RUNS).in_use == 2

    stale.limit = 5
    request = RequestFactory().post("/admin/")
    request.user = admin_user
    site._registry[Semaphore].save_model(request, stale, form=None, change=True)

    fresh = semaphore(gate.RUNS)
    assert (fresh.limit, fresh.in_use) == (5, 2) == (5, lease_count(gate.RUNS))


def test_an_api_limit_edit_during_a_run_leaves_in_use_right(make_card, slow_provider, admin_user):
    """PATCHing a provider's concurrency while its run holds call slots changes only the
    semaphore's limit: in_use stays what the lease rows say, and a raised limit is used at
    once by the run's waiting cases."""
    run = started_run(make_card(cases=4), slow_provider)
    provider_name = gate.provider_semaphore(slow_provider.pk)
    admission.admit_cases(slow_provider.pk)
    assert semaphore(provider_name).in_use == lease_count(provider_name) == 2

    api = APIClient()
    api.force_authenticate(admin_user)
    lowered = api.patch(
        f"/api/providers/{slow_provider.pk}/", {"max_concurrency": 1}, format="json"
    )
    assert lowered.status_code == 200, lowered.content
    fresh = semaphore(provider_name)
    assert (fresh.limit, fresh.in_use) == (1, 2) == (1, lease_count(provider_name))

    raised = api.patch(f"/api/providers/{slow_provider.pk}/", {"max_concurrency": 3}, format="json")
    assert raised.status_code == 200, raised.content
    fresh = semaphore(provider_name)
    assert (fresh.limit, fresh.in_use) == (3, 3) == (3, lease_count(provider_name))
    assert run.results.filter(status="running").count() == 3


def test_an_admin_limit_edit_in_the_list_promotes_waiters(make_card, slow_provider, admin_client):
    limits.ensure_semaphores(slow_provider)
    limits.set_limit(gate.RUNS, 0)
    run = launching.launch_run(card=make_card(), provider=slow_provider)
    runs = semaphore(gate.RUNS)
    others = list(Semaphore.objects.exclude(pk=runs.pk))
    form = {
        "form-TOTAL_FORMS": str(1 + len(others)),
        "form-INITIAL_FORMS": str(1 + len(others)),
        "_save": "Save",
    }
    for i, row in enumerate([runs, *others]):
        form[f"form-{i}-id"] = str(row.pk)
        form[f"form-{i}-limit"] = "1" if row.pk == runs.pk else str(row.limit)
    response = admin_client.post("/admin/testruns/semaphore/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    run.refresh_from_db()
    assert run.status == TestRun.Status.RUNNING
    assert semaphore(gate.RUNS).in_use == lease_count(gate.RUNS) == 1


def test_a_running_run_and_a_busy_semaphore_cannot_be_deleted(
    make_card, slow_provider, admin_client
):
    run = started_run(make_card(), slow_provider)
    admission.admit_cases(slow_provider.pk)

    page = admin_client.get(f"/admin/testruns/testrun/{run.pk}/delete/")
    assert page.status_code == 403
    busy = semaphore(gate.provider_semaphore(slow_provider.pk))
    assert admin_client.get(f"/admin/testruns/semaphore/{busy.pk}/delete/").status_code == 403
    with pytest.raises(ProtectedError):
        TestRun.objects.filter(pk=run.pk).delete()
    with pytest.raises(ProtectedError):
        busy.delete()
    assert semaphore(gate.RUNS).in_use == lease_count(gate.RUNS) == 1


def test_a_deleted_idle_semaphore_comes_back_with_its_configured_limit(
    make_card, slow_provider, admin_client
):
    started_run(make_card(cases=1), slow_provider)
    idle = semaphore(gate.provider_semaphore(slow_provider.pk))
    response = admin_client.post(f"/admin/testruns/semaphore/{idle.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Semaphore.objects.filter(pk=idle.pk).exists()

    assert len(admission.admit_cases(slow_provider.pk)) == 1
    back = semaphore(gate.provider_semaphore(slow_provider.pk))
    assert (back.limit, back.in_use) == (slow_provider.max_concurrency, 1)


# --- holders are unique per process start -----------------------------------------------------


def worker_in_its_own_pid_namespace(env: dict[str, str], hostname: str) -> ChildProcess:
    """A Dramatiq worker as a restarted container runs it: same host name, and (in a fresh
    pid namespace, where numbering starts again at 1) the same pids as the previous one."""
    command = (
        f"hostname {hostname} && exec {sys.executable} manage.py rundramatiq "
        "--processes 1 --threads 2 --worker-shutdown-timeout 1000"
    )
    return ChildProcess(
        "pidns-worker",
        ["unshare", "--pid", "--fork", "--uts", "--mount-proc", "sh", "-c", command],
        env,
    )


@pytest.mark.django_db(transaction=True)
def test_a_worker_with_the_host_and_pid_of_a_dead_one_does_not_keep_its_leases(
    process_env, make_card, fake_llm
):
    # util-linux's unshare, as root: a fresh pid namespace is how a restarted container gets
    # the same pid again. No skip: without it the test fails, in CI and elsewhere.
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--pid", "--fork", "--uts", "true"], cwd=ROOT).returncode
    ):
        pytest.fail("this test needs util-linux's unshare and root (pid and UTS namespaces)")
    provider = Provider.objects.create(
        name="Fake",
        kind=Provider.Kind.OPENAI,
        model="fake-1",
        base_url=fake_llm.base_url,
        max_concurrency=4,
    )
    env = process_env | {"LEASE_TTL_SECONDS": "120", "SWEEP_INTERVAL_SECONDS": "0.5"}
    fake_llm.latency = 300  # the first worker never finishes its cases
    run = launching.launch_run(
        card=make_card(cases=2), provider=provider, timeout_seconds=600, max_retries=0
    )

    first = worker_in_its_own_pid_namespace(env, "restarted-host")
    try:
        wait_for(lambda: fake_llm.in_flight == 2, timeout=60, what="both cases to be mid-call")
        (dead,) = WorkerHeartbeat.objects.filter(hostname="restarted-host")
    finally:
        first.stop(signal.SIGKILL)  # no hand-back: its leases stay behind
    assert Lease.objects.filter(holder=dead.holder).count() == 2

    fake_llm.latency = 0
    second = worker_in_its_own_pid_namespace(env, "restarted-host")
    try:
        wait_for(
            lambda: TestRun.objects.get(pk=run.pk).status in TestRun.FINISHED,
            timeout=60,
            what="the run to finish long before the 120 s lease TTL",
        )
        (alive,) = WorkerHeartbeat.objects.filter(hostname="restarted-host").exclude(
            holder=dead.holder
        )
        assert (alive.hostname, alive.pid) == (dead.hostname, dead.pid), "pids differ"
        assert alive.holder != dead.holder
        assert "handed back 2 case(s) of an earlier process with this host and pid" in (
            second.output()
        )
    finally:
        second.stop()
    run.refresh_from_db()
    assert run.status == TestRun.Status.SUCCEEDED
    assert not Lease.objects.exists()


def test_the_heartbeat_renews_only_leases_of_cases_in_flight_so_a_forgotten_one_returns(
    make_card, slow_provider
):
    run = started_run(make_card(cases=1), slow_provider)
    (admitted,) = admission.admit_cases(slow_provider.pk)
    lease_id = gate.claim_case(admitted.result_id, "host:1:boot")
    assert lease_id is not None

    assert gate.heartbeat("host:1:boot", []) == 0  # forgotten: not in flight here
    assert gate.heartbeat("host:1:boot", [lease_id]) == 1
    with connection.cursor() as cursor:  # its TTL runs out, as it does when nothing renews it
        cursor.execute("UPDATE testruns_lease SET expires_at = now() WHERE id = %s", [lease_id])
    assert admission.reclaim_expired_cases() == 1
    (again,) = Lease.objects.filter(result_id=admitted.result_id)
    assert again.pk != lease_id and again.holder == ""  # admitted again, for any worker
    assert run.pk
