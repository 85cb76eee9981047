"""What a notice says. `compose` builds it once per delivery, as JSON (the webhook's body, kept
on the delivery so every attempt sends the same bytes); the Slack and e-mail forms are read
from that JSON. Every form links to the run's report and says what changed: the cases that
regressed (by name), the pass rate before and after, and the cost."""

from __future__ import annotations

from decimal import Decimal

from testruns.models import NotificationDelivery, NotificationRule, TestRun
from testruns.models.notifications import EVENTS
from testruns.reporting.run_changes import RunChanges, what_changed
from testruns.reporting.terminal import report_url

HEADLINES = {
    "regression": "Regression",
    "error": "Error",
    "failure": "Failure",
    "finish": "Finished",
}


def events_met(run: TestRun, changes: RunChanges) -> list[str]:
    """Which events the run met, in EVENTS order (the first is a notice's headline)."""
    met = {
        "regression": changes.regression,
        "error": run.status == TestRun.Status.ERROR,
        "failure": run.status == TestRun.Status.FAILED,
        "finish": True,
    }
    return [event for event in EVENTS if met[event]]


def rule_events(rule: NotificationRule, met: list[str]) -> list[str]:
    """The events the rule asked for that the run met (empty: nothing to send)."""
    wanted = set(rule.events())
    return [event for event in met if event in wanted]


def percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.0f}%"


def dollars(amount: Decimal | str | None) -> str:
    return "n/a" if amount is None else f"${Decimal(amount):.4f}"


def compose(delivery: NotificationDelivery) -> dict:
    """The notice of `delivery` (its rule's events the run met; empty "events" when none)."""
    run, rule = delivery.run, delivery.rule
    changes = what_changed(run)
    events = rule_events(rule, events_met(run, changes))
    baseline = changes.baseline
    schedule = run.schedule_launch.schedule if run.schedule_launch_id else None
    notice = {
        "delivery": delivery.pk,
        "rule": {"id": rule.pk, "name": rule.name},
        "event": events[0] if events else None,
        "events": events,
        "run": {
            "id": run.pk,
            "url": report_url(run),
            "status": run.status,
            "card": {"id": run.card_id, "slug": run.card.slug, "name": run.card.name},
            "provider": {"id": run.provider_id, "name": run.provider.name},
            "version": run.version.number,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "total_cases": run.total_cases,
            "passed": run.passed_count,
            "failed": run.failed_count,
            "errors": run.error_count,
            "pass_rate": changes.pass_rate_after,
            "cost": str(changes.cost_after),
        },
        "baseline": baseline
        and {
            "id": baseline.pk,
            "url": report_url(baseline),
            "pass_rate": changes.pass_rate_before,
            "cost": str(changes.cost_before),
        },
        "changes": {
            "regressed": changes.regressed,
            "regression_count": changes.regression_count,
            "fixed": changes.fixed,
            "fix_count": changes.fix_count,
            "pass_rate_before": changes.pass_rate_before,
            "pass_rate_after": changes.pass_rate_after,
            "cost_before": None if changes.cost_before is None else str(changes.cost_before),
            "cost_after": str(changes.cost_after),
        },
        "schedule": schedule and {"id": schedule.pk, "name": schedule.name},
    }
    notice["summary"] = summary(notice)
    return notice


def summary(notice: dict) -> str:
    """One line: what happened to which card on which provider, and the pass rate."""
    run, changes = notice["run"], notice["changes"]
    headline = HEADLINES.get(notice["event"] or "finish", "Finished")
    what = f"{run['card']['name']} on {run['provider']['name']} (run #{run['id']}, {run['status']})"
    if changes["regression_count"]:
        count = changes["regression_count"]
        what += f": {count} case{'s' if count != 1 else ''} regressed"
    rates = (
        f"pass rate {percent(changes['pass_rate_before'])} → {percent(changes['pass_rate_after'])}"
    )
    if changes["pass_rate_before"] is None:
        rates = f"pass rate {percent(changes['pass_rate_after'])}"
    return f"{headline}: {what}; {rates}"


def detail_lines(notice: dict) -> list[str]:
    """The rest, a line each: the regressed and fixed cases, the cost, the report."""
    changes, run = notice["changes"], notice["run"]
    lines = []
    if changes["regressed"]:
        more = changes["regression_count"] - len(changes["regressed"])
        lines.append(
            "Regressed: "
            + ", ".join(changes["regressed"])
            + (f" and {more} more" if more > 0 else "")
        )
    if changes["fixed"]:
        more = changes["fix_count"] - len(changes["fixed"])
        lines.append(
            "Fixed: " + ", ".join(changes["fixed"]) + (f" and {more} more" if more > 0 else "")
        )
    cost = f"Cost: {dollars(changes['cost_after'])}"
    if changes["cost_before"] is not None:
        cost += f" (baseline {dollars(changes['cost_before'])})"
    lines.append(cost)
    if notice["schedule"]:
        lines.append(f"Schedule: {notice['schedule']['name']}")
    lines.append(f"Report: {run['url']}")
    return lines


def _slack_escape(text: str) -> str:
    # Slack reads &, < and > as markup (links, mentions); case names are the users' own text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(notice: dict) -> dict:
    """An incoming-webhook message: `text` (what clients without blocks show) and one block
    with the summary, the details and a link to the report."""
    url = notice["run"]["url"]
    lines = [_slack_escape(line) for line in detail_lines(notice)[:-1]]
    text = _slack_escape(notice["summary"])
    return {
        "text": f"{text} <{url}|Report>",
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": "\n".join([f"*{text}*", *lines, f"<{url}|Open the report>"]),
                },
            }
        ],
    }


def email_message(notice: dict) -> tuple[str, str]:
    """Subject and plain-text body."""
    subject = f"[Prompt Card Runner] {notice['summary']}"
    return subject[:250], "\n".join([notice["summary"], "", *detail_lines(notice), ""])
