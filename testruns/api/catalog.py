"""Cards, their versions and test cases, and providers: what runs are made of."""

from __future__ import annotations

from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import exceptions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from testruns.api.params import query_bool, query_choice, query_reference, query_text
from testruns.api.permissions import CommandProvidersForSuperusers, ModelPermissions
from testruns.api.serializers.catalog import (
    CardSerializer,
    ProviderSerializer,
    TestCaseSerializer,
    VersionSerializer,
)
from testruns.api.serializers.shared import CardField
from testruns.catalog import card_files, cards, lookup
from testruns.engine import limits
from testruns.models import PromptCard, PromptVersion, Provider, TestCase


def _flag(data: object, name: str) -> bool:
    """A boolean of a JSON body (true/false) or a form (true/false/1/0/on)."""
    value = data.get(name, False) if hasattr(data, "get") else False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "on", "false", "0", "off", ""):
        return value.lower() in ("true", "1", "on")
    raise exceptions.ValidationError({name: ["Enter true or false."]})


class RefetchAfterSaveMixin:
    """Answer writes with the object as the list shows it (with its annotations)."""

    def perform_create(self, serializer) -> None:
        self.after_save(serializer.save(**self.save_kwargs()), serializer)

    def perform_update(self, serializer) -> None:
        self.after_save(serializer.save(), serializer)

    def save_kwargs(self) -> dict:
        return {}

    def after_save(self, instance, serializer) -> None:
        serializer.instance = self.get_queryset().get(pk=instance.pk)


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("tag", OpenApiTypes.STR, description="Cards with this tag."),
            OpenApiParameter("slug", OpenApiTypes.STR, description="The card with this slug."),
        ]
    )
)
class CardViewSet(RefetchAfterSaveMixin, viewsets.ModelViewSet):
    """Prompt cards. Saving a changed prompt snapshots a new immutable version (with
    `change_note`); a card with runs cannot be deleted (409)."""

    serializer_class = CardSerializer
    permission_classes = [ModelPermissions]
    queryset = PromptCard.objects.all()

    def get_queryset(self) -> QuerySet[PromptCard]:
        latest = PromptVersion.objects.filter(card=OuterRef("pk")).order_by("-number")
        cases = (
            TestCase.objects.filter(card=OuterRef("pk"))
            .order_by()
            .values("card")
            .annotate(n=Count("pk"))
            .values("n")
        )
        cards = (
            PromptCard.objects.select_related("owner")
            .annotate(
                latest_version=Subquery(latest.values("number")[:1]),
                case_count=Coalesce(Subquery(cases), 0),
            )
            .order_by("name", "pk")
        )
        if self.action == "list":
            if tag := query_text(self.request, "tag", max_length=50):
                cards = cards.filter(tags__contains=[tag])
            if slug := query_text(self.request, "slug"):
                cards = cards.filter(slug=slug)
        return cards

    def save_kwargs(self) -> dict:
        return {"owner": self.request.user}

    @extend_schema(request=None, responses={201: CardSerializer})
    @action(detail=True, methods=["post"])
    def duplicate(self, request: Request, pk=None) -> Response:
        """Copy the card and its test cases under a free "<slug>-copy" slug."""
        if not request.user.has_perm("testruns.add_promptcard"):
            raise exceptions.PermissionDenied("You may not add cards.")
        copy = cards.duplicate_card(self.get_object(), user=request.user)
        return Response(
            self.get_serializer(self.get_queryset().get(pk=copy.pk)).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(
        parameters=[
            OpenApiParameter("file_format", OpenApiTypes.STR, enum=["yaml", "json", "promptfoo"]),
            OpenApiParameter(
                "slug", OpenApiTypes.STR, many=True, description="Only these cards (default: all)."
            ),
            OpenApiParameter(
                "provider",
                OpenApiTypes.STR,
                many=True,
                description="promptfoo: the providers of the config, by name (default: those "
                "of the cards' latest runs).",
            ),
        ],
        responses={
            (200, "text/plain"): OpenApiTypes.STR,
            (200, "application/zip"): OpenApiTypes.BINARY,
        },
    )
    @action(detail=False, methods=["get"], url_path="export")
    def export(self, request: Request) -> HttpResponse:
        """Cards with their test cases as YAML or JSON (the import_cards file format), or as a
        zip of a promptfoo project (`file_format=promptfoo`) that `promptfoo eval` runs."""
        fmt = query_choice(request, "file_format", ["yaml", "json", "promptfoo"]) or "yaml"
        slugs = request.query_params.getlist("slug")
        if any(len(slug) > 200 or "\x00" in slug for slug in slugs):
            raise exceptions.ValidationError({"slug": ["Enter card slugs."]})
        cards = PromptCard.objects.prefetch_related("cases").order_by("slug")
        if slugs:
            cards = cards.filter(slug__in=slugs)
        if fmt == "promptfoo":
            cards = list(cards.select_related("grader_provider"))
            names = request.query_params.getlist("provider")
            providers = list(Provider.objects.filter(name__in=names)) if names else None
            if names and len(providers) != len(set(names)):
                raise exceptions.ValidationError({"provider": ["Name existing providers."]})
            content = card_files.export_promptfoo_zip(
                cards, providers or card_files.default_providers(cards)
            )
            response = HttpResponse(content, content_type="application/zip")
            response["Content-Disposition"] = 'attachment; filename="promptfoo.zip"'
            return response
        content_type = "application/json" if fmt == "json" else "application/yaml"
        return HttpResponse(card_files.export_cards(cards, fmt), content_type=content_type)

    @extend_schema(
        request=inline_serializer(
            "CardImport",
            {
                "filename": serializers.CharField(
                    max_length=200,
                    required=False,
                    help_text="Its extension decides the format: .yaml, .yml, .json or .csv.",
                ),
                "content": serializers.CharField(trim_whitespace=False, required=False),
                "file": serializers.FileField(
                    required=False,
                    help_text="Instead of filename and content (multipart): the file, or a .zip "
                    "of a promptfoo project (its configs and the files they name).",
                ),
                "update": serializers.BooleanField(
                    required=False, help_text="Apply changes to cards that exist already."
                ),
                "strict": serializers.BooleanField(
                    required=False, help_text="Refuse the import if anything would be left out."
                ),
                "create_providers": serializers.BooleanField(
                    required=False,
                    help_text="Create the promptfoo providers matching none stored (disabled).",
                ),
                "card": CardField(
                    required=False,
                    allow_null=True,
                    help_text="For a CSV: the card of its cases, by slug (or id).",
                ),
            },
        ),
        responses={
            200: inline_serializer(
                "CardImportReport",
                {
                    "summary": serializers.CharField(),
                    "not_imported": serializers.ListField(child=serializers.CharField()),
                    "changes": serializers.ListField(child=serializers.CharField()),
                    "providers_found": serializers.ListField(child=serializers.CharField()),
                    "providers_missing": serializers.ListField(child=serializers.DictField()),
                    "providers_created": serializers.ListField(child=serializers.CharField()),
                    **{
                        name: serializers.IntegerField()
                        for name in (
                            "cards_created",
                            "cards_updated",
                            "cards_unchanged",
                            "cases_created",
                            "cases_updated",
                            "cases_unchanged",
                            "versions_created",
                        )
                    },
                },
            )
        },
    )
    @action(
        detail=False,
        methods=["post"],
        url_path="import",
        parser_classes=[JSONParser, MultiPartParser, FormParser],
    )
    def import_file(self, request: Request) -> Response:
        """Import cards and cases as the admin's import page does: all or nothing, every
        problem named with its place in the file; a .zip is a promptfoo project. Cards that
        exist already change only with `update` (else: 400 listing what would change)."""
        if not request.user.has_perm("testruns.add_promptcard"):
            raise exceptions.PermissionDenied("You may not add cards.")
        data = request.data if hasattr(request.data, "get") else {}
        upload = data.get("file")
        if upload is not None and hasattr(upload, "read"):
            filename, content = upload.name, upload.read(card_files.MAX_UPLOAD_BYTES + 1)
        else:
            filename, content = data.get("filename"), data.get("content")
        if not isinstance(filename, str) or not filename or len(filename) > 200:
            raise exceptions.ValidationError({"filename": ["Give the file's name."]})
        if not isinstance(content, str | bytes):
            raise exceptions.ValidationError({"content": ["Give the file's text."]})
        card = None
        if filename.lower().endswith(".csv") and data.get("card") is not None:
            try:
                card = CardField().to_internal_value(data["card"])
            except serializers.ValidationError as exc:
                raise exceptions.ValidationError({"card": exc.detail}) from None
        try:
            report = card_files.import_cards(
                content,
                filename=filename,
                user=request.user,
                card=card,
                **{name: _flag(data, name) for name in card_files.IMPORT_FLAGS},
            )
        except card_files.CardFileError as exc:
            raise exceptions.ValidationError({"content": exc.errors}) from None
        return Response(report.as_dict())


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter(
                "card", OpenApiTypes.STR, description="Versions of this card: its slug or id."
            )
        ]
    )
)
class VersionViewSet(viewsets.ReadOnlyModelViewSet):
    """Immutable prompt snapshots; a new one appears when a card's prompt changes."""

    serializer_class = VersionSerializer
    permission_classes = [ModelPermissions]
    read_permissions = ("testruns.view_promptcard",)
    queryset = PromptVersion.objects.all()

    def get_queryset(self) -> QuerySet[PromptVersion]:
        versions = PromptVersion.objects.select_related("author").order_by("card_id", "-number")
        if self.action == "list" and (card := query_reference(self.request, "card", lookup.CARD)):
            versions = versions.filter(card_id=card)
        return versions


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter(
                "card", OpenApiTypes.STR, description="Cases of this card: its slug or id."
            ),
            OpenApiParameter("tag", OpenApiTypes.STR, description="Cases with this tag."),
            OpenApiParameter("enabled", OpenApiTypes.BOOL),
        ]
    )
)
class TestCaseViewSet(viewsets.ModelViewSet):
    """Test cases: variables for the card's template, and assertions on the answer."""

    serializer_class = TestCaseSerializer
    permission_classes = [ModelPermissions]
    read_permissions = ("testruns.view_promptcard",)
    queryset = TestCase.objects.all()

    def get_queryset(self) -> QuerySet[TestCase]:
        cases = TestCase.objects.order_by("card_id", "order", "pk")
        if self.action == "list":
            if card := query_reference(self.request, "card", lookup.CARD):
                cases = cases.filter(card_id=card)
            if tag := query_text(self.request, "tag", max_length=50):
                cases = cases.filter(tags__contains=[tag])
            if (enabled := query_bool(self.request, "enabled")) is not None:
                cases = cases.filter(enabled=enabled)
        return cases


class ProviderViewSet(RefetchAfterSaveMixin, viewsets.ModelViewSet):
    """LLM providers. `api_key_env` names the environment variable that holds the key on
    the workers; a key itself is never accepted or shown. Local command providers are for
    superusers only. A provider with runs cannot be deleted (409); disable it instead."""

    serializer_class = ProviderSerializer
    permission_classes = [ModelPermissions, CommandProvidersForSuperusers]
    queryset = Provider.objects.order_by("name")

    def after_save(self, instance, serializer) -> None:
        limits.save_provider_limit(instance)
        super().after_save(instance, serializer)
