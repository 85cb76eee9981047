"""This host's CPU, memory and load, and whether it is too busy to take new work.

Resource-aware admission is optional: with WORKER_MAX_CPU_PERCENT and
WORKER_MIN_FREE_MEMORY_MB at 0 (the default) a host is never too busy. A worker asks
`host_pressure()` before it takes a new case and records the answer in its heartbeat
(`WorkerHeartbeat.accepting` and `note`), which the dashboard and /api/system/resources/ show.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import psutil
from django.conf import settings

# psutil measures CPU between two calls; the first call only starts the clock. Starting it at
# import makes the next reading (a heartbeat, a page) an average since then instead of 0.
psutil.cpu_percent(interval=None)


@dataclass(frozen=True)
class HostSnapshot:
    cpu_percent: float
    memory_total_mb: float
    memory_available_mb: float
    load_average: tuple[float, float, float]
    cpu_count: int

    def as_dict(self) -> dict:
        return asdict(self) | {"load_average": list(self.load_average)}


def host_snapshot() -> HostSnapshot:
    memory = psutil.virtual_memory()
    return HostSnapshot(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_total_mb=memory.total / 2**20,
        memory_available_mb=memory.available / 2**20,
        load_average=tuple(os.getloadavg()),
        cpu_count=psutil.cpu_count() or 1,
    )


def limits() -> dict[str, float | None]:
    """The configured thresholds; None where the check is off."""
    return {
        "max_cpu_percent": float(settings.WORKER_MAX_CPU_PERCENT) or None,
        "min_free_memory_mb": float(settings.WORKER_MIN_FREE_MEMORY_MB) or None,
    }


def host_pressure(snapshot: HostSnapshot | None = None) -> str | None:
    """None when the host has room for more work; otherwise why not, for people to read
    (e.g. "CPU 97% > 90%", "free memory 180 MB < 512 MB")."""
    bounds = limits()
    if bounds["max_cpu_percent"] is None and bounds["min_free_memory_mb"] is None:
        return None
    snapshot = snapshot or host_snapshot()
    reasons = []
    if bounds["max_cpu_percent"] is not None and snapshot.cpu_percent > bounds["max_cpu_percent"]:
        reasons.append(f"CPU {snapshot.cpu_percent:.0f}% > {bounds['max_cpu_percent']:g}%")
    floor = bounds["min_free_memory_mb"]
    if floor is not None and snapshot.memory_available_mb < floor:
        reasons.append(f"free memory {snapshot.memory_available_mb:.0f} MB < {floor:g} MB")
    return "; ".join(reasons) or None
