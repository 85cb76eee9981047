from __future__ import annotations

from django import forms
from django.contrib.auth import get_user_model
from django.db import models
from django.db.models import Exists, OuterRef

from testruns.engine.run_settings import form_field
from testruns.models import PromptCard, PromptVersion, Provider, TestCase, TestRun

# Where the launch page keeps the user's last launch (LaunchForm.choices_to_remember).
LAST_LAUNCH_SESSION_KEY = "testruns.last_launch"


class LaunchForm(forms.Form):
    """A card, one or more providers (one run each), which cases, and the configuration.
    Versions, tags and cases are those of the chosen card (the page re-renders for another
    card), and clean() checks they belong to it whatever was posted."""

    class Selection:
        ALL, TAG, PICKED = "all", "tag", "picked"
        CHOICES = [
            (ALL, "All enabled cases"),
            (TAG, "Cases with any of these tags"),
            (PICKED, "These cases"),
        ]

    card = forms.ModelChoiceField(queryset=PromptCard.objects.all())
    version = forms.ModelChoiceField(
        queryset=PromptVersion.objects.none(),
        required=False,
        empty_label="Latest",
        help_text="The card's latest prompt unless you pick an older version.",
    )
    providers = forms.ModelMultipleChoiceField(
        queryset=Provider.objects.filter(enabled=True),
        widget=forms.CheckboxSelectMultiple,
        help_text="Several providers launch one run each, grouped as a comparison.",
    )
    selection = forms.ChoiceField(
        choices=Selection.CHOICES,
        initial=Selection.ALL,
        widget=forms.RadioSelect,
        label="Test cases",
    )
    tags = forms.MultipleChoiceField(
        choices=[], required=False, widget=forms.CheckboxSelectMultiple
    )
    cases = forms.ModelMultipleChoiceField(
        queryset=TestCase.objects.none(),
        required=False,
        widget=forms.SelectMultiple(attrs={"size": 8}),
    )
    # The bounds of these numbers are TestRun's (engine.run_settings), as in the API and CLI.
    max_concurrent_tests = form_field("max_concurrent_tests", label="Max concurrent cases")
    timeout_seconds = form_field("timeout_seconds", label="Timeout per case (s)")
    stop_on_failure = forms.BooleanField(required=False, label="Stop on first failure")
    max_retries = form_field("max_retries", label="Retries")
    use_cache = forms.BooleanField(required=False, label="Use the response cache")
    repeats = form_field(
        "repeats",
        help_text="A case passes only when every repeat passes; with the cache on, only the "
        "first repeat may be answered from it.",
    )
    grader_provider = forms.ModelChoiceField(
        queryset=Provider.objects.filter(enabled=True),
        required=False,
        empty_label="The card's grader, else each run's own provider",
        label="Grader provider",
        help_text="Grades llm-rubric assertions.",
    )
    priority = form_field("priority")

    CONFIG = [
        "max_concurrent_tests",
        "timeout_seconds",
        "stop_on_failure",
        "max_retries",
        "use_cache",
        "repeats",
        "grader_provider",
    ]

    # What the page offers again from the user's last launch: the providers and the
    # configuration. Not the version, tags or cases: those belong to one card.
    REMEMBERED = ["providers", *CONFIG, "priority"]

    def __init__(
        self, *args, card: PromptCard | None = None, remembered: dict | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.chosen_card = card
        for name in self.REMEMBERED:
            # A provider since disabled or deleted is simply not among the choices any more.
            if remembered and name in remembered:
                self.initial.setdefault(name, remembered[name])
        if card is None:
            return
        self.fields["card"].initial = card.pk
        self.fields["version"].queryset = card.versions.order_by("-number")
        self.fields["version"].label_from_instance = lambda v: (
            f"v{v.number} · {v.created_at:%Y-%m-%d %H:%M}"
            + (f" · {v.change_note}" if v.change_note else "")
        )
        enabled = card.cases.filter(enabled=True).order_by("order", "pk")
        self.fields["cases"].queryset = enabled
        tags = sorted(
            {tag for case_tags in enabled.values_list("tags", flat=True) for tag in case_tags}
        )
        self.fields["tags"].choices = [(tag, tag) for tag in tags]

    def clean(self) -> dict:
        data = super().clean()
        card = data.get("card")
        if card is None:
            return data
        if self.chosen_card is None or card.pk != self.chosen_card.pk:
            raise forms.ValidationError("Choose the card first, then its cases.")
        version = data.get("version")
        if version is not None and version.card_id != card.pk:
            self.add_error("version", "That version belongs to another card.")
        selection = data.get("selection")
        if selection == self.Selection.TAG:
            if not data.get("tags"):
                self.add_error("tags", "Pick at least one tag.")
            elif not card.cases.filter(enabled=True, tags__overlap=data["tags"]).exists():
                self.add_error("tags", "No enabled case has any of these tags.")
        elif selection == self.Selection.PICKED and not data.get("cases"):
            self.add_error("cases", "Pick at least one case.")
        return data

    def launch_arguments(self) -> dict:
        """The keyword arguments of launching.launch_runs (all but the user)."""
        data = self.cleaned_data
        selection = data["selection"]
        return {
            "cards": [data["card"]],
            "providers": list(data["providers"]),
            "version": data["version"].number if data["version"] else None,
            "case_ids": (
                [case.pk for case in data["cases"]] if selection == self.Selection.PICKED else None
            ),
            "tags": data["tags"] if selection == self.Selection.TAG else None,
            "priority": data["priority"],
            **{name: data[name] for name in self.CONFIG},
        }

    def choices_to_remember(self) -> dict:
        """The launched card and the REMEMBERED choices, as the session can store them."""
        data = self.cleaned_data
        remembered = {"card": data["card"].pk}
        for name in self.REMEMBERED:
            value = data[name]
            if isinstance(value, models.Model):
                value = value.pk
            elif name == "providers":
                value = [provider.pk for provider in value]
            remembered[name] = value
        return remembered


def remember_launch(session, form: LaunchForm) -> None:
    session[LAST_LAUNCH_SESSION_KEY] = form.choices_to_remember()


def last_launch(session) -> dict:
    """What remember_launch kept of the user's last launch from the launch page, or {}."""
    remembered = session.get(LAST_LAUNCH_SESSION_KEY)
    return remembered if isinstance(remembered, dict) else {}


def card_to_launch(requested, remembered: dict, *, fall_back: bool) -> PromptCard | None:
    """The card the launch page is about: the one asked for (?card=, or the form's), else
    (with `fall_back`) the one last launched, else the first by name."""
    card = PromptCard.objects.filter(pk=requested).first() if str(requested).isdigit() else None
    if card is not None or not fall_back:
        return card
    last = remembered.get("card")
    card = PromptCard.objects.filter(pk=last).first() if isinstance(last, int) else None
    return card or PromptCard.objects.order_by("name").first()


class HistoryFilterForm(forms.Form):
    card = forms.ModelChoiceField(
        queryset=PromptCard.objects.all(), required=False, empty_label="Any card"
    )
    provider = forms.ModelChoiceField(
        queryset=Provider.objects.all(), required=False, empty_label="Any provider"
    )
    status = forms.ChoiceField(
        choices=[("", "Any status"), *TestRun.Status.choices], required=False
    )
    launcher = forms.ModelChoiceField(
        queryset=get_user_model().objects.none(), required=False, empty_label="Anyone"
    )
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        # A semi-join on the launcher index: a join and DISTINCT would read every run.
        launched = TestRun.objects.filter(launched_by=OuterRef("pk"))
        users = get_user_model().objects.filter(Exists(launched))
        if user is not None and not user.has_perm("testruns.view_testrun"):
            users = users.filter(pk=user.pk)
        self.fields["launcher"].queryset = users.order_by("username")
