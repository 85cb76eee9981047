"""Cron expressions of schedules: which are valid, and when one is next due in its time zone.

Five fields (minute hour day month weekday) as in crontab, the @aliases (@hourly, @daily, ...),
or six with seconds first (as Quartz and Spring write them: `*/10 * * * * *` is every ten
seconds). A pure module (croniter and zoneinfo only): the Schedule model validates with it and
the engine's scheduling computes due times with it, always from a moment the database gave.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import croniter
from croniter.croniter import CroniterError
from django.core.exceptions import ValidationError

ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# Counting the due times a long outage skipped is only for the log and the launch's row; past
# this many the count says "at least".
MAX_COUNTED_MISSES = 1000
# get_prev is strictly before its start; a microsecond later makes "at or before".
_TICK = timedelta(microseconds=1)


def _iterator(expression: str, start: datetime) -> croniter:
    return croniter(expression.strip(), start, second_at_beginning=True)


def check_cron(expression: str) -> None:
    """Raise ValidationError unless `expression` is a cron expression a schedule can use."""
    text = (expression or "").strip()
    if text.lower() in ALIASES:
        return
    fields = text.split()
    if len(fields) not in (5, 6):
        raise ValidationError(
            "Give five fields (minute hour day month weekday, e.g. 0 6 * * 1-5), six with "
            "seconds first (e.g. */30 * * * * *), or an alias such as @daily.",
            code="cron_fields",
        )
    try:
        _iterator(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterError, ValueError, KeyError) as exc:
        raise ValidationError(f"Not a valid cron expression: {exc}", code="cron") from None


def check_time_zone(name: str) -> None:
    if name not in _zone_names():
        raise ValidationError(
            f"{name or 'An empty name'} is not an IANA time zone (e.g. UTC, Europe/Paris, "
            "America/New_York).",
            code="time_zone",
        )


@functools.lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones() | {"UTC"})


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def next_after(expression: str, time_zone: str, moment: datetime) -> datetime:
    """The first due time strictly after `moment`, in UTC. Fields are read in the schedule's
    time zone, so `0 9 * * *` in Europe/Paris stays at 09:00 local across daylight saving."""
    local = moment.astimezone(zone(time_zone))
    return _iterator(expression, local).get_next(datetime).astimezone(UTC)


def latest_at_or_before(expression: str, time_zone: str, moment: datetime) -> datetime:
    """The last due time at or before `moment`, in UTC."""
    local = (moment + _TICK).astimezone(zone(time_zone))
    return _iterator(expression, local).get_prev(datetime).astimezone(UTC)


def due_times_between(expression: str, time_zone: str, first: datetime, last: datetime) -> int:
    """How many due times lie in [first, last] (at most MAX_COUNTED_MISSES + 1)."""
    if last < first:
        return 0
    count, current = 0, first - _TICK
    iterator = _iterator(expression, current.astimezone(zone(time_zone)))
    while count <= MAX_COUNTED_MISSES:
        current = iterator.get_next(datetime).astimezone(UTC)
        if current > last:
            break
        count += 1
    return count
