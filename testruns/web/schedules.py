"""The schedules page: the schedules a user may see with their next due time and last launch,
a form to add or change one, and pause / resume. Thin: saving goes through the one service
that plans the next due time (engine.scheduling), as in the admin and the API."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.db.models import OuterRef, Subquery
from django.http import Http404, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from testruns.engine import run_settings, scheduling
from testruns.models import PromptCard, Provider, Schedule, ScheduleLaunch
from testruns.models.schedules import RUN_OPTIONS

# Who may add and change schedules here: as in the admin, plus launching (runs are launched
# as the schedule's owner).
ADD = ("testruns.add_schedule", "testruns.launch_testrun")
CHANGE = ("testruns.change_schedule", "testruns.launch_testrun")


class ScheduleForm(forms.ModelForm):
    providers = forms.ModelMultipleChoiceField(
        queryset=Provider.objects.filter(enabled=True).order_by("name"),
        widget=forms.CheckboxSelectMultiple,
        help_text="One run per card and provider.",
    )
    card = forms.ModelChoiceField(
        queryset=PromptCard.objects.order_by("name"),
        required=False,
        help_text="The card to run; or leave it empty and give a tag.",
    )

    class Meta:
        model = Schedule
        fields = ["name", "card", "card_tag", "providers", "cron", "time_zone", "paused"] + list(
            RUN_OPTIONS
        )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in run_settings.BOUNDED:  # the same fields, bounds and widgets as a launch
            if name in self.fields:
                self.fields[name] = run_settings.form_field(name, label=self.fields[name].label)


def _may(user, perms: tuple[str, ...]) -> bool:
    return user.has_perms(perms)


def _schedule_or_404(request, pk) -> Schedule:
    schedule = scheduling.schedules_visible_to(request.user).filter(pk=pk).first()
    if schedule is None:
        raise Http404("No such schedule.")
    return schedule


@require_GET
def schedule_list(request) -> HttpResponse:
    last = ScheduleLaunch.objects.filter(schedule=OuterRef("pk")).order_by("-due_at")
    schedules = (
        scheduling.schedules_visible_to(request.user)
        .annotate(
            last_due_at=Subquery(last.values("due_at")[:1]),
            last_runs=Subquery(last.values("run_count")[:1]),
            last_error=Subquery(last.values("error")[:1]),
        )
        .order_by("name", "pk")
    )
    return render(
        request,
        "testruns/schedules.html",
        {
            "schedules": schedules,
            "can_add": _may(request.user, ADD),
            "can_change": _may(request.user, CHANGE),
        },
    )


def schedule_edit(request, pk=None) -> HttpResponse:
    """GET shows the form (empty for a new schedule); POST saves it and leads to the list."""
    schedule = _schedule_or_404(request, pk) if pk is not None else None
    if not _may(request.user, CHANGE if schedule else ADD):
        return HttpResponseForbidden("You may not add or change schedules.")
    initial = {"card": request.GET.get("card")} if schedule is None else None
    form = ScheduleForm(request.POST or None, instance=schedule, initial=initial)
    if request.method == "POST" and form.is_valid():
        saved = form.save(commit=False)
        if saved.owner_id is None:
            saved.owner = request.user
        scheduling.save_schedule(saved, providers=form.cleaned_data["providers"])
        messages.success(request, f"Schedule {saved.name} saved.")
        return redirect("schedules")
    return render(request, "testruns/schedule_form.html", {"form": form, "schedule": schedule})


@require_POST
def schedule_pause(request, pk) -> HttpResponse:
    schedule = _schedule_or_404(request, pk)
    if not _may(request.user, CHANGE):
        return HttpResponseForbidden("You may not change schedules.")
    paused = request.POST.get("paused") == "1"
    scheduling.set_paused(schedule, paused)
    messages.success(request, f"Schedule {schedule.name} {'paused' if paused else 'resumed'}.")
    return redirect("schedules")
