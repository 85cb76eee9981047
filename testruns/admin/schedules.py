"""Schedules and notifications in the admin. Schedules are saved through the one service that
plans their next due time (engine.scheduling); the launches of due times and the delivery log
of notifications are read-only: the workers write them."""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from testruns.catalog import provider_rules
from testruns.engine import scheduling
from testruns.models import (
    DeliveryAttempt,
    NotificationDelivery,
    NotificationRule,
    Schedule,
    ScheduleLaunch,
)
from testruns.models.schedules import RUN_OPTIONS

RECENT_LAUNCHES = 10


class ReadOnlyAdmin(admin.ModelAdmin):
    """What the workers write: seen, never edited here."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class NotificationRuleForm(forms.ModelForm):
    url = forms.URLField(
        required=False,
        max_length=500,
        assume_scheme="https",
        help_text=NotificationRule._meta.get_field("url").help_text,
    )

    class Meta:
        model = NotificationRule
        fields = "__all__"


class NotificationInline(admin.TabularInline):
    model = NotificationRule
    form = NotificationRuleForm
    fk_name = "schedule"
    extra = 0
    fields = ["name", "channel", "url", "recipients", "enabled"]
    show_change_link = True


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    list_display = ["name", "target", "cron", "time_zone", "paused", "next_due_at", "owner"]
    list_filter = ["paused"]
    list_select_related = ["card", "owner"]
    search_fields = ["name", "card__name", "card_tag", "cron"]
    filter_horizontal = ["providers"]
    readonly_fields = ["next_due_at", "recent_launches"]
    actions = ["pause", "resume"]
    inlines = [NotificationInline]
    fieldsets = [
        (None, {"fields": ["name", "card", "card_tag", "providers", "owner"]}),
        ("When", {"fields": ["cron", "time_zone", "paused", "next_due_at"]}),
        ("Run options", {"fields": list(RUN_OPTIONS)}),
        ("Launches", {"fields": ["recent_launches"]}),
    ]

    def get_changeform_initial_data(self, request) -> dict:
        return {"owner": request.user.pk, **super().get_changeform_initial_data(request)}

    def get_readonly_fields(self, request, obj=None) -> list[str]:
        # A schedule's runs are launched as its owner: only a superuser may make them someone
        # else's; anyone else's schedule is their own.
        if request.user.is_superuser:
            return self.readonly_fields
        return [*self.readonly_fields, "owner"]

    def save_model(self, request, obj, form, change) -> None:
        if not request.user.is_superuser and (not change or obj.owner_id is None):
            obj.owner = request.user
        scheduling.save_schedule(obj)  # the providers follow in save_related

    @admin.display(description="runs")
    def target(self, schedule: Schedule) -> str:
        return schedule.target

    @admin.display(description="recent launches")
    def recent_launches(self, schedule: Schedule) -> str:
        launches = schedule.launches.order_by("-due_at")[:RECENT_LAUNCHES] if schedule.pk else []
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    f"{launch.due_at:%Y-%m-%d %H:%M:%S}",
                    launch.run_count,
                    launch.missed,
                    launch.error,
                )
                for launch in launches
            ),
        )
        if not rows:
            return "None yet."
        link = (
            reverse("admin:testruns_schedulelaunch_changelist")
            + f"?schedule__id__exact={schedule.pk}"
        )
        return format_html(
            "<table><tr><th>due</th><th>runs</th><th>missed before</th><th>refused because</th>"
            '</tr>{}</table><a href="{}">All launches</a>',
            rows,
            link,
        )

    @admin.action(description="Pause the selected schedules", permissions=["change"])
    def pause(self, request, queryset: QuerySet[Schedule]) -> None:
        for schedule in queryset:
            scheduling.set_paused(schedule, True)
        self.message_user(request, f"{len(queryset)} schedule(s) paused.", messages.SUCCESS)

    @admin.action(description="Resume the selected schedules", permissions=["change"])
    def resume(self, request, queryset: QuerySet[Schedule]) -> None:
        for schedule in queryset:
            scheduling.set_paused(schedule, False)
        self.message_user(request, f"{len(queryset)} schedule(s) resumed.", messages.SUCCESS)


@admin.register(ScheduleLaunch)
class ScheduleLaunchAdmin(ReadOnlyAdmin):
    list_display = ["schedule", "due_at", "launched_at", "run_count", "missed", "error", "worker"]
    list_filter = ["schedule"]
    list_select_related = ["schedule"]
    date_hierarchy = "due_at"


@admin.register(NotificationRule)
class NotificationRuleAdmin(admin.ModelAdmin):
    form = NotificationRuleForm
    list_display = ["name", "channel", "about", "events", "enabled"]
    list_filter = ["channel", "enabled"]
    list_select_related = ["schedule", "card"]
    search_fields = ["name", "url", "recipients"]
    fieldsets = [
        (None, {"fields": ["name", "enabled", "schedule", "card"]}),
        ("When", {"fields": ["on_regression", "on_failure", "on_error", "on_finish"]}),
        ("Where", {"fields": ["channel", "url", "secret_env", "recipients"]}),
    ]

    def get_form(self, request, obj=None, change=False, **kwargs) -> type[forms.ModelForm]:
        form = super().get_form(request, obj, change, **kwargs)
        if "secret_env" in form.base_fields:  # say the rule before it refuses a name
            form.base_fields["secret_env"].help_text += (
                f" It must match {provider_rules.key_env_pattern().pattern} "
                "(PROVIDER_KEY_ENV_PATTERN) and not be one of this app's own settings."
            )
        return form

    @admin.display(description="about")
    def about(self, rule: NotificationRule) -> str:
        return f"schedule {rule.schedule}" if rule.schedule_id else f"card {rule.card}"

    @admin.display(description="events")
    def events(self, rule: NotificationRule) -> str:
        return ", ".join(rule.events())


class AttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    fields = readonly_fields = ["number", "started_at", "finished_at", "ok", "status_code", "error"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(ReadOnlyAdmin):
    """The delivery log: every notice, its status and each attempt at it."""

    list_display = ["pk", "rule", "run_link", "channel", "status", "attempts", "created_at"]
    list_filter = ["status", "channel"]
    list_select_related = ["rule", "run"]
    search_fields = ["rule__name", "summary", "last_error"]
    inlines = [AttemptInline]
    fields = [
        "rule",
        "run_link",
        "channel",
        "status",
        "events",
        "summary",
        "attempts",
        "last_error",
        "created_at",
        "next_attempt_at",
        "finished_at",
        "notice",
    ]
    readonly_fields = fields

    @admin.display(description="run")
    def run_link(self, delivery: NotificationDelivery) -> str:
        return format_html(
            '<a href="{}">#{}</a>', reverse("report", args=[delivery.run_id]), delivery.run_id
        )

    @admin.display(description="what was sent")
    def notice(self, delivery: NotificationDelivery) -> str:
        return format_html("<pre>{}</pre>", json.dumps(delivery.payload, indent=2, sort_keys=True))
