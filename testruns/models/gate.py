"""The rows behind the concurrency gate: semaphores and their leases, worker heartbeats, and the
names and lock keys of the gate's rows."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from testruns.models.runs import TestResult, TestRun

# The gate's semaphore rows, and the advisory locks that serialise the queue: the one place
# their names and keys are written (the gate, admission, launching and the snapshots of the
# queue all read them from here).
RUNS_SEMAPHORE = "runs"
RUNS_PER_USER_SEMAPHORE = "runs-per-user"
# Serialises the admission check with the insert of the run it admits (launches only; no
# semaphore row is taken while holding it, so it cannot deadlock with them).
ADMISSION_LOCK_KEY = 730_104_3
# Taken by readers of the whole queue, for one consistent picture of it.
QUEUE_LOCK_KEY = 7_301_042


def provider_semaphore(provider_id: int) -> str:
    return f"provider:{provider_id}"


class Semaphore(models.Model):
    """A counting semaphore. The row is the lock; `in_use` always equals the number of its
    lease rows (both change in the same statement), so a holder checks and takes a slot
    without counting. `effective_limit` is the provider's current AIMD ceiling after 429s,
    `throttled_at` when it was last halved (see gate.throttle_provider)."""

    name = models.CharField(max_length=200, unique=True)
    limit = models.PositiveIntegerField()
    in_use = models.PositiveIntegerField(default=0, editable=False)
    effective_limit = models.FloatField(null=True, blank=True, editable=False)
    throttled_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="When a 429 last halved the effective limit (database clock).",
    )
    corrections = models.PositiveIntegerField(
        default=0,
        editable=False,
        help_text="How often the sweeper found in_use apart from the lease rows and reset it.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} (limit {self.limit})"


class Lease(models.Model):
    """One held slot. Its holder heartbeats `expires_at` forward; a dead holder's lease runs
    out and the sweeper reclaims it. Times come from the database clock.

    Only the gate deletes leases, because it lowers `in_use` in the same statement: deleting
    a semaphore, a run or a result that still holds one is refused (PROTECT)."""

    semaphore = models.ForeignKey(Semaphore, on_delete=models.PROTECT, related_name="leases")
    holder = models.CharField(max_length=200)
    run = models.ForeignKey(
        TestRun, null=True, blank=True, on_delete=models.PROTECT, related_name="leases"
    )
    result = models.ForeignKey(
        TestResult, null=True, blank=True, on_delete=models.PROTECT, related_name="leases"
    )
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["expires_at"], name="lease_expiry"),
            models.Index(fields=["holder"], name="lease_holder"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["result"], name="one_lease_per_result"),
            models.UniqueConstraint(
                fields=["semaphore", "run"], name="one_run_slot_per_run", condition=Q(result=None)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.semaphore.name} held by {self.holder}"


class WorkerHeartbeat(models.Model):
    """One row per live worker process, refreshed by its lease keeper: what the dashboard,
    /healthz and /api/system/resources show about workers."""

    holder = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    cpu_percent = models.FloatField(default=0)
    memory_available_mb = models.FloatField(default=0)
    load_average = models.FloatField(default=0)
    accepting = models.BooleanField(
        default=True, help_text="False while the host is too busy to take new cases."
    )
    note = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["hostname", "pid"]

    def __str__(self) -> str:
        return self.holder
