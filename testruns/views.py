"""Pages. Thin: they translate the request and call services and selectors."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from testruns import services
from testruns.forms import LaunchForm
from testruns.selectors import get_run_for_user, run_snapshot, runs_visible_to


@require_GET
def dashboard(request):
    runs = runs_visible_to(request.user)[:50]
    return render(request, "testruns/dashboard.html", {"runs": runs})


@permission_required("testruns.launch_testrun", raise_exception=True)
def launch(request):
    form = LaunchForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            run = services.launch_run(
                card=form.cleaned_data["card"], provider=form.cleaned_data["provider"],
                user=request.user, priority=form.cleaned_data["priority"],
            )
        except services.LaunchError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Run #{run.pk} queued.")
            return redirect(run)
    return render(request, "testruns/launch.html", {"form": form})


def _run_or_404(request, pk):
    run = get_run_for_user(request.user, pk)
    if run is None:
        raise Http404("No such run.")
    return run


@require_GET
def run_detail(request, pk):
    run = _run_or_404(request, pk)
    return render(request, "testruns/run_detail.html", {"run": run})


@require_GET
def run_status(request, pk):
    """The page's fallback when it has no WebSocket: the same snapshot, polled."""
    return JsonResponse(run_snapshot(_run_or_404(request, pk)))
