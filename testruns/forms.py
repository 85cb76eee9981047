from __future__ import annotations

from django import forms

from testruns.models import PromptCard, Provider


class LaunchForm(forms.Form):
    card = forms.ModelChoiceField(queryset=PromptCard.objects.all())
    provider = forms.ModelChoiceField(queryset=Provider.objects.filter(enabled=True))
    priority = forms.IntegerField(initial=0, min_value=-100, max_value=100)
