"""Monotonic counters behind /metrics, one row per series (name and labels). They only grow:
engine.counters adds to them in the transactions that finish things, so they stay right
across any number of processes and hosts, and deleting runs never takes anything back."""

from __future__ import annotations

from django.db import models


class MetricCounter(models.Model):
    name = models.CharField(max_length=100)
    labels = models.JSONField(default=dict)
    value = models.FloatField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name", "labels"], name="one_counter_per_series")
        ]

    def __str__(self) -> str:
        return f"{self.name}{self.labels}"
