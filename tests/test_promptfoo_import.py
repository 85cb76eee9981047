"""Importing promptfoo projects as promptfoo reads them (tests/data/promptfoo/): file://
prompts, tests and vars, defaultTest everywhere, vars in assertion values, collisions, the
update flag, --strict, providers, and zips that try to escape."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from rest_framework.test import APIClient

from testruns.catalog.card_files import CardFileError, ProjectFiles, import_cards, import_project
from testruns.models import PromptCard, Provider, TestCase

DATA = Path(__file__).parent / "data" / "promptfoo"
TRAVEL = DATA / "travel"


def zipped(folder: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


def cases_of(slug: str) -> dict[str, TestCase]:
    return {case.name: case for case in PromptCard.objects.get(slug=slug).cases.all()}


@pytest.mark.django_db
def test_a_project_folder_imports_as_promptfoo_reads_it(user):
    report = import_project(ProjectFiles.from_folder(TRAVEL), user=user)

    cards = {card.slug: card for card in PromptCard.objects.all()}
    # One card per prompt: a text file, a file of two prompts split by ---, a JSON chat.
    assert sorted(cards) == [
        "travel-assistant-1",
        "travel-assistant-2",
        "travel-assistant-3",
        "travel-assistant-chat",
    ]
    assert cards["travel-assistant-1"].template == "Plan a {{tone}} day in {{city}}."
    assert cards["travel-assistant-2"].template == "Describe {{city}} in one sentence."
    assert cards["travel-assistant-3"].template == "List three sights in {{city}}, {{tone}}ly."
    chat = cards["travel-assistant-chat"]
    assert (chat.system_prompt, chat.template) == (
        "You are a {{tone}} travel agent.",
        "What should I see in {{city}}?",
    )
    assert report.cards_created == 4 and report.cases_created == 4 * 5

    cases = cases_of("travel-assistant-chat")
    assert list(cases) == [
        "Paris trip",
        "Lima trip",
        "Shouting",
        "Levenshtein and latency",
        "Yes stays text",
    ]
    paris, lima = cases["Paris trip"], cases["Lima trip"]
    # defaultTest reaches tests from CSV and YAML files: its vars fill gaps, its assertions
    # come first, with the test's vars rendered into them.
    assert paris.variables == {"tone": "friendly", "city": "Paris"}
    assert paris.assertions[:2] == [
        {"type": "llm-rubric", "value": "Recommends something to do in Paris"},
        {"type": "javascript", "value": "output.length < 2000"},
    ]
    assert paris.assertions[2:] == [
        {"type": "contains", "value": "Paris"},
        {"type": "javascript", "value": "output.includes(context.vars.city)"},
    ]
    assert paris.tags == ["region:europe", "short", "city"]  # __metadata:tags[] as tags
    assert lima.assertions[0]["value"] == "Recommends something to do in Lima"
    assert lima.assertions[3] == {
        "type": "similar",
        "value": "Things to do in Lima",
        "threshold": 0.5,
    }
    shouting = cases["Shouting"]
    assert shouting.variables["notes"] == "The Colosseum opens at 9.\n"  # a var from a file
    # options.transform runs first on every assertion, then an assertion's own.
    assert shouting.assertions[2] == {
        "type": "contains",
        "value": "ROME",
        "transform": ["output.toUpperCase()"],
    }
    assert shouting.assertions[3]["transform"] == ["output.toUpperCase()", "output.toLowerCase()"]
    bern = cases["Levenshtein and latency"]
    assert bern.assertions[2:] == [
        {"type": "levenshtein", "value": {"expected": "Bern is calm", "max": 40}},
        {"type": "latency", "value": 60000},
    ]
    oslo = cases["Yes stays text"]
    assert oslo.variables["answer"] == "Yes"  # YAML 1.2: not a boolean
    assert oslo.tags == ["region:europe"]
    assert oslo.assertions[2] == {"type": "icontains-any", "value": ["oslo", "norway"]}
    assert oslo.assertions[3]["metric"] == "length"
    assert (oslo.assertions[3]["threshold"], oslo.assertions[3]["weight"]) == (0.2, 2)
    assert len(oslo.assertions) == 4  # the python assertion is refused, and listed

    not_imported = "\n".join(report.not_imported)
    assert "promptfooconfig.yaml: tests[2].assert[2]: python: python assertions run Python" in (
        not_imported
    )
    assert "promptfooconfig.yaml: evaluateOptions: run settings are chosen" in not_imported
    assert "providers[3]: exec:./run.sh: no provider kind of this app matches it" in not_imported
    assert {p["id"] for p in report.providers_missing} == {
        "openai:chat:gpt-4o-mini",
        "openai:chat:travel-model",
        "anthropic:messages:claude-3-5-haiku-latest",
    }


@pytest.mark.django_db
def test_the_same_project_as_a_zip_imports_the_same_cards(user):
    import_cards(zipped(TRAVEL, "travel/"), filename="travel.zip", user=user)

    assert PromptCard.objects.count() == 4
    assert cases_of("travel-assistant-1")["Shouting"].variables["notes"].startswith("The Col")


@pytest.mark.django_db
def test_configs_without_description_are_named_after_their_folders_and_never_collide():
    report = import_project(ProjectFiles.from_folder(DATA / "collide"))

    assert report.cards_created == 3
    names = set(PromptCard.objects.values_list("name", flat=True))
    # Two folders named "one": each is named with the folders above it.
    assert names == {"collide one", "two", "collide nested one"}
    assert cases_of("two")["first"].variables == {"name": "Bob"}
    assert cases_of("collide-one")["first"].variables == {"name": "Ada"}


@pytest.mark.django_db
def test_importing_onto_stored_cards_shows_the_changes_and_needs_update(tmp_path):
    shutil.copytree(DATA / "collide" / "two", tmp_path / "two")
    import_project(ProjectFiles.from_folder(tmp_path / "two"))
    config = tmp_path / "two" / "promptfooconfig.yaml"
    config.write_text(config.read_text().replace("Wave at", "Bow to").replace("bob", "BOB"))

    with pytest.raises(CardFileError) as refused:
        import_project(ProjectFiles.from_folder(tmp_path / "two"))

    message = str(refused.value)
    assert "these cards exist already and the import would change them" in message
    assert "card two: template" in message
    assert "card two: case 'first': assertions" in message
    assert PromptCard.objects.get(slug="two").template == "Wave at {{ name }}"

    report = import_project(ProjectFiles.from_folder(tmp_path / "two"), update=True)

    assert report.changes == ["card two: template", "card two: case 'first': assertions"]
    assert PromptCard.objects.get(slug="two").template == "Bow to {{ name }}"


@pytest.mark.django_db
def test_strict_refuses_what_would_be_left_out(user):
    with pytest.raises(CardFileError) as refused:
        import_project(ProjectFiles.from_folder(TRAVEL), strict=True)

    assert "strict: nothing was imported" in str(refused.value)
    assert "python assertions run Python code" in str(refused.value)
    assert PromptCard.objects.count() == 0


@pytest.mark.django_db
def test_missing_providers_are_created_disabled_with_key_names_only():
    Provider.objects.create(name="Mini", kind="openai", model="gpt-4o-mini")

    report = import_project(ProjectFiles.from_folder(TRAVEL), create_providers=True)

    assert report.providers_found == ["openai:chat:gpt-4o-mini is the provider Mini"]
    created = Provider.objects.exclude(name="Mini").order_by("name")
    assert [(p.name, p.kind, p.model, p.enabled) for p in created] == [
        (
            "anthropic:messages:claude-3-5-haiku-latest",
            "anthropic",
            "claude-3-5-haiku-latest",
            False,
        ),
        ("openai:chat:travel-model", "openai", "travel-model", False),
    ]
    assert [p.api_key_env for p in created] == ["ANTHROPIC_API_KEY", "OPENAI_API_KEY"]
    assert created[1].base_url == "http://127.0.0.1:9/v1"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"../evil.txt": b"x", "promptfooconfig.yaml": b"prompts: [x]"}, "paths with .. are not"),
        ({"/etc/passwd": b"x"}, "absolute paths are not allowed"),
        ({f"f{i}.txt": b"" for i in range(2001)}, "2001 files is more than the limit of 2000"),
    ],
)
def test_unsafe_zips_are_refused_with_every_reason(entries, expected):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in entries.items():
            archive.writestr(name, body)

    with pytest.raises(CardFileError, match=expected):
        import_cards(buffer.getvalue(), filename="bad.zip")


@pytest.mark.django_db
def test_a_reference_out_of_the_project_and_a_missing_file_are_both_reported(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "secret.txt").write_text("nope")
    (tmp_path / "p" / "promptfooconfig.yaml").write_text(
        "prompts: [file://../secret.txt, file://missing.txt]\n"
    )

    with pytest.raises(CardFileError) as refused:
        import_project(ProjectFiles.from_folder(tmp_path / "p"))

    assert str(refused.value).splitlines() == [
        "promptfooconfig.yaml: prompts[0]: file://../secret.txt: it points outside the project",
        "promptfooconfig.yaml: prompts[1]: file://missing.txt: missing.txt cannot be read: "
        "no such file in the project",
    ]


@pytest.mark.django_db
def test_a_lone_config_with_file_references_asks_for_its_folder():
    with pytest.raises(CardFileError, match="import the project's folder .CLI. or a .zip of it"):
        import_cards((TRAVEL / "promptfooconfig.yaml").read_bytes(), filename="c.yaml")


@pytest.mark.django_db
def test_the_command_imports_folders_and_zips_with_its_flags(tmp_path, capsys):
    (tmp_path / "travel.zip").write_bytes(zipped(TRAVEL))

    call_command("import_cards", str(DATA / "collide"), str(tmp_path / "travel.zip"))
    out = capsys.readouterr().out
    with pytest.raises(CommandError, match="--strict|strict: nothing was imported"):
        call_command("import_cards", str(TRAVEL), "--strict")

    assert "collide: cards: 3 created" in out
    assert "not imported: promptfooconfig.yaml: tests[2].assert[2]: python" in out
    assert "provider to create: openai:chat:gpt-4o-mini" in out
    assert PromptCard.objects.count() == 7


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser("root", password="root-password-1")


@pytest.mark.django_db
def test_the_api_takes_a_zip_upload_with_its_flags_and_exports_a_promptfoo_zip(root, tmp_path):

    api = APIClient()
    api.force_authenticate(root)
    upload = io.BytesIO(zipped(DATA / "collide"))
    upload.name = "collide.zip"

    imported = api.post("/api/cards/import/", {"file": upload}, format="multipart")
    assert imported.status_code == 200, imported.json()
    assert imported.json()["cards_created"] == 3 and imported.json()["not_imported"] == []
    changed = tmp_path / "collide"
    shutil.copytree(DATA / "collide", changed)
    config = changed / "two" / "promptfooconfig.yaml"
    config.write_text(config.read_text().replace("Wave at", "Bow to"))
    again = io.BytesIO(zipped(changed))
    again.name = "collide.zip"
    refused = api.post("/api/cards/import/", {"file": again}, format="multipart")
    assert refused.status_code == 400
    assert "card two: template" in refused.json()["content"]
    again.seek(0)
    updated = api.post("/api/cards/import/", {"file": again, "update": "true"}, format="multipart")
    assert updated.json()["changes"] == ["card two: template"]

    exported = api.get("/api/cards/export/?file_format=promptfoo&slug=two")
    assert exported["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(exported.content))
    assert (
        "prompts:\n  - raw: Bow to {{ name }}\n    label: two\n"
        in archive.read("promptfooconfig.yaml").decode()
    )


@pytest.mark.django_db
def test_the_admin_imports_a_zip_lists_what_it_left_out_and_exports_for_promptfoo(client, root):

    client.force_login(root)
    upload = io.BytesIO(zipped(TRAVEL))
    upload.name = "travel.zip"

    page = client.post(reverse("admin:testruns_promptcard_import"), {"file": upload}, follow=True)

    text = "\n".join(str(message) for message in page.context["messages"])
    assert "cards: 4 created" in text
    assert "not imported: promptfooconfig.yaml: tests[2].assert[2]: python" in text
    assert "provider to create: openai:chat:gpt-4o-mini" in text
    exported = client.post(
        reverse("admin:testruns_promptcard_changelist"),
        {
            "action": "export_promptfoo",
            "_selected_action": list(PromptCard.objects.values_list("pk", flat=True)),
        },
    )
    assert exported["Content-Type"] == "application/zip"
    names = sorted(zipfile.ZipFile(io.BytesIO(exported.content)).namelist())
    assert names == ["promptfooconfig.yaml", "prompts/travel-assistant-chat.json"]
