"""The gate's semaphores in the admin: their limits are data, changed through
engine.limits."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.db.models.functions import Now

from testruns.engine import limits
from testruns.models import Semaphore


@admin.register(Semaphore)
class SemaphoreAdmin(admin.ModelAdmin):
    list_display = ["name", "limit", "in_use", "updated_at"]
    list_editable = ["limit"]
    search_fields = ["name"]
    readonly_fields = ["in_use", "effective_limit"]

    def save_model(self, request, obj, form, change) -> None:
        """Only the limit is written, through engine.limits (which creates a new semaphore's
        row): saving the whole row would put the in_use and AIMD ceiling read when the page
        opened over what workers wrote since."""
        limits.set_limit(obj.name, obj.limit)  # a raised limit promotes waiters at once
        if obj.pk is None:  # a new row, inserted by the service rather than by obj.save()
            obj.pk = Semaphore.objects.values_list("pk", flat=True).get(name=obj.name)
        obj.refresh_from_db()

    def has_delete_permission(self, request, obj=None) -> bool:
        """A semaphore holding leases stays (its slots would be lost); an idle one may go
        and is created again with its configured limit when next needed."""
        return super().has_delete_permission(request, obj) and (
            obj is None or not obj.leases.exists()
        )

    def get_queryset(self, request) -> QuerySet[Semaphore]:
        return (
            super()
            .get_queryset(request)
            .annotate(live=Count("leases", filter=Q(leases__expires_at__gt=Now())))
        )

    @admin.display(description="in use", ordering="live")
    def in_use(self, semaphore) -> int:
        return semaphore.live
