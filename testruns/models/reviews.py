"""A person's review of a result: marked for review (why), then confirmed or overridden with
a note. The automatic verdict (the result's status) is never changed: a review stands beside
it, and the reviewed pass rate counts the person's verdict where there is one."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from testruns.models.runs import TestResult


class Review(models.Model):
    class Reason(models.TextChoices):
        FAILURE = "failure", "failed or errored"
        SAMPLE = "sample", "a sample of the passes"
        NO_EVIDENCE = "no-evidence", "not enough evidence against the baseline"
        ASKED = "asked", "asked for"

    class Verdict(models.TextChoices):
        PASSED = "passed"
        FAILED = "failed"

    result = models.OneToOneField(TestResult, on_delete=models.CASCADE, related_name="review")
    reason = models.CharField(max_length=20, choices=Reason.choices)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_at = models.DateTimeField(auto_now_add=True)
    # Empty until someone decides.
    verdict = models.CharField(max_length=10, choices=Verdict.choices, blank=True)
    note = models.TextField(blank=True)
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["requested_at", "id"]
        indexes = [
            models.Index(
                fields=["requested_at"], name="review_pending", condition=models.Q(verdict="")
            ),
        ]

    def __str__(self) -> str:
        return f"review of {self.result}"

    @property
    def is_pending(self) -> bool:
        return not self.verdict

    @property
    def overrides(self) -> bool:
        """The person's verdict differs from the automatic one (an error read as a failure)."""
        automatic = (
            self.Verdict.PASSED if self.result.status == TestResult.Status.PASSED else "failed"
        )
        return bool(self.verdict) and self.verdict != automatic
