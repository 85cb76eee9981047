"""Who may do what through the API: the same rules as the pages and the admin."""

from __future__ import annotations

from rest_framework import permissions

from testruns.catalog import provider_rules


class ModelPermissions(permissions.DjangoModelPermissions):
    """Writes need the model's add/change/delete permission, as in the admin. Reads need its
    view permission, one of the view's `read_permissions`, or the launch permission."""

    perms_map = {
        **permissions.DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request, view) -> bool:
        if request.method in permissions.SAFE_METHODS and request.user.is_authenticated:
            alternatives = (*getattr(view, "read_permissions", ()), "testruns.launch_testrun")
            if any(request.user.has_perm(perm) for perm in alternatives):
                return True
        return super().has_permission(request, view)


class RunPermissions(permissions.IsAuthenticated):
    """Any user reads the runs they may see; launching and cancelling need permissions."""

    required = {
        "POST": ("testruns.launch_testrun", "You may not launch runs."),
        "DELETE": ("testruns.cancel_testrun", "You may not cancel runs."),
    }

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        perm, message = self.required.get(request.method, (None, ""))
        if perm and not request.user.has_perm(perm):
            self.message = message
            return False
        return True


class CommandProvidersForSuperusers(permissions.BasePermission):
    """A local command runs on the worker hosts: only superusers change such providers (the
    rule is provider_rules.may_manage_provider, as in the admin)."""

    message = provider_rules.COMMAND_PROVIDER_MESSAGE

    def has_object_permission(self, request, view, obj) -> bool:
        return request.method in permissions.SAFE_METHODS or provider_rules.may_manage_provider(
            request.user, obj
        )
