"""The case editor: a test case's variables and assertions as rows instead of two JSON boxes.

Progressive enhancement: the form fields stay JSON textareas, so a post without JavaScript (and
every test that posts JSON) works as before; static/testruns/case_editor.js builds the rows
over them and writes the JSON back. What the server adds: JSON errors with line and column,
no follow-on errors from a field that did not parse, the variables the card's prompt reads,
and the table of assertion types (input shape and help) that the rows are built from.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.functional import lazy
from django.utils.html import format_html

from testruns.catalog.assertions import ASSERTION_TYPES
from testruns.models import PromptCard, TestCase

# Each base type: the shape of the input its value needs (case_editor.js knows each shape),
# and one line of help. The not- variants take their base type's shape.
TYPE_HELP: dict[str, tuple[str, str]] = {
    "equals": ("text-or-json", "The whole output equals the text; a JSON value compares as JSON."),
    "contains": ("text", "The output contains the text (case-sensitive)."),
    "icontains": ("text", "The output contains the text, ignoring case."),
    "contains-any": ("list", "The output contains at least one of the strings (one per line)."),
    "contains-all": ("list", "The output contains every one of the strings (one per line)."),
    "starts-with": ("text", "The output starts with the text."),
    "regex": ("text", "The output matches the Python regular expression (re.search)."),
    "is-json": ("schema-optional", "The output is JSON; with a JSON schema, it must match it."),
    "json-schema": ("schema", "The output is JSON matching the JSON schema (required)."),
    "json-path": ("json-path", "The value at a path such as $.status equals a JSON value."),
    "levenshtein": ("levenshtein", "The edit distance to the expected text is at most max."),
    "word-count": ("word-count", "The output has between min and max words (either optional)."),
    "latency": ("number-ms", "The call took at most this many milliseconds."),
    "cost": ("number-usd", "The call cost at most this many dollars."),
    "llm-rubric": ("rubric", "A grader model judges the output against this rubric."),
    "icontains-any": ("list", "The output contains at least one of the strings, ignoring case."),
    "icontains-all": ("list", "The output contains every one of the strings, ignoring case."),
    "contains-json": (
        "schema-optional",
        "The output holds a JSON object somewhere; with a schema, one that matches it.",
    ),
    "is-valid-openai-tools-call": (
        "json",
        "The output (JSON) calls only these OpenAI tools, with arguments matching each one's "
        "parameters.",
    ),
    "javascript": (
        "rubric",
        "JavaScript run in a sandbox with `output` and `context`: one line is an expression, "
        "several a function body; true/false, a score, or {pass, score, reason}.",
    ),
    "rouge-n": ("text", "ROUGE-1 overlap with the reference reaches the threshold (0.75)."),
    "bleu": ("text", "BLEU-4 against the reference (or several) reaches the threshold (0.5)."),
    "similar": ("text", "Embeddings' cosine similarity to the text reaches the threshold (0.75)."),
    "factuality": ("rubric", "A grader compares the output's facts with this expert answer."),
    "answer-relevance": (
        "json",
        "A grader writes questions the output answers; they must be close to what was asked.",
    ),
    "g-eval": ("rubric", "A grader scores the output 0-10 on these criteria (passes at 0.7)."),
    "model-graded-closedqa": ("rubric", "A grader answers Y or N: does the output meet this?"),
}


def _type_table() -> list[dict[str, str]]:
    """Every registered type, base types first, each with its input shape and help."""
    rows = []
    for name in sorted(ASSERTION_TYPES, key=lambda n: (n.startswith("not-"), n)):
        base = name.removeprefix("not-")
        kind, help_text = TYPE_HELP[base]
        if name != base:
            help_text = f"Passes when {base} fails. {base}: {help_text}"
        rows.append({"name": name, "kind": kind, "help": help_text})
    return rows


def reference_url() -> str:
    return reverse("assertion-reference")


def _help(text: str) -> Any:
    # Lazy: URLs cannot be reversed while the admin modules are imported.
    return lazy(lambda: format_html(text, url=reference_url()), str)()


class JSONWithPositionField(forms.JSONField):
    """forms.JSONField, whose error says where the JSON breaks: "Line 2, column 5: ..."."""

    def to_python(self, value: Any) -> Any:
        try:
            return super().to_python(value)
        except ValidationError:
            try:
                json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValidationError(
                    "Enter a valid JSON. Line %(line)s, column %(column)s: %(problem)s.",
                    code="invalid",
                    params={"line": exc.lineno, "column": exc.colno, "problem": exc.msg},
                ) from None
            raise


class CaseJSONWidget(forms.Textarea):
    """The JSON textarea inside a container that case_editor.js builds its rows in."""

    def __init__(self, editor: str, attrs: dict | None = None) -> None:
        self.editor = editor
        super().__init__({"rows": 4, "cols": 60, **(attrs or {})})

    def render(self, name: str, value: Any, attrs: dict | None = None, renderer=None) -> str:
        # The form renderer draws the textarea; the wrapper is a project template, which the
        # default form renderer (app directories only) would not find.
        textarea = super().render(name, value, attrs, renderer)
        return render_to_string(
            "admin/testruns/case_editor/widget.html",
            {"textarea": textarea, "editor": self.editor, "reference_url": reference_url()},
        )

    class Media:
        css = {"all": ["testruns/case_editor.css"]}
        js = ["testruns/case_editor.js"]


class TestCaseForm(forms.ModelForm):
    """A case as the editor edits it: the inline's form, and any admin form of a case."""

    variables = JSONWithPositionField(
        required=False,
        initial=dict,
        widget=CaseJSONWidget("variables"),
        help_text="What fills the card's template: one row per variable the template reads.",
    )
    assertions = JSONWithPositionField(
        required=False,
        initial=list,
        widget=CaseJSONWidget("assertions"),
        help_text=_help(
            'Checks on the output: type, value and weight. <a href="{url}" target="_blank" '
            'rel="noopener">Assertion reference</a>'
        ),
    )
    order = forms.IntegerField(
        required=False,
        widget=forms.NumberInput(attrs={"placeholder": "after the last"}),
        help_text="Empty: after the card's last case.",
    )

    class Meta:
        model = TestCase
        fields = "__all__"

    def __init__(self, *args, template_variables: list[str] | None = None, **kwargs) -> None:
        """`template_variables`: what the card's prompt reads (the inline knows it once for
        all its cases); without it, the case's own card is asked."""
        super().__init__(*args, **kwargs)
        if template_variables is None:
            card = self.instance.card if self.instance.card_id else None
            template_variables = sorted(card.required_variables()) if card else []
        widget = self.fields["variables"].widget
        widget.attrs["data-template-variables"] = json.dumps(list(template_variables))

    def clean_variables(self) -> Any:
        return {} if self.cleaned_data["variables"] is None else self.cleaned_data["variables"]

    def clean_assertions(self) -> Any:
        return [] if self.cleaned_data["assertions"] is None else self.cleaned_data["assertions"]

    def _update_errors(self, errors: ValidationError) -> None:
        """The model's checks run on the instance, which keeps its old value for a field
        whose input did not parse: the message about that field is the parse error alone
        (no "Missing variables for the template" after broken JSON)."""
        if hasattr(errors, "error_dict"):
            failed = set(self._errors) - {NON_FIELD_ERRORS}
            for field in [name for name in errors.error_dict if name in failed]:
                del errors.error_dict[field]
            if not errors.error_dict:
                return
        super()._update_errors(errors)


class TestCaseInline(admin.StackedInline):
    model = TestCase
    form = TestCaseForm
    extra = 0
    fields = [("name", "enabled", "order"), "variables", "assertions", ("threshold", "tags")]
    template = "admin/testruns/case_editor/stacked.html"

    @property
    def editor_types(self) -> dict[str, Any]:
        """What the inline's template hands case_editor.js, once for every case on the page."""
        return {"types": _type_table(), "reference": reference_url()}

    def get_formset(self, request, obj: PromptCard | None = None, **kwargs) -> type:
        formset = super().get_formset(request, obj, **kwargs)
        # The card as posted when a post comes back with errors, so a new template's
        # variables show at once; on a new card's empty page, the page's script reads them.
        names = sorted(obj.required_variables()) if obj is not None else []

        class CaseFormSet(formset):
            def get_form_kwargs(self, index: int | None) -> dict:
                return {**super().get_form_kwargs(index), "template_variables": names}

        return CaseFormSet
