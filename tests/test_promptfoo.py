"""The real promptfoo (installed by `make promptfoo` under var/node) validates and runs what
`export_cards --format promptfoo` writes, against the fake vendor, and judges every test as
our own run of the same cards on the same vendor does. Without npm the test fails in CI and
is skipped on a developer machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command

from testruns.catalog.card_files import ProjectFiles, import_cards, import_project
from testruns.engine import launching
from testruns.models import PromptCard, Provider
from tests.conftest import ROOT, run_in_this_thread

AGREE = Path(__file__).parent / "data" / "promptfoo" / "agree"
NODE_BIN = ROOT / "var" / "node" / "node_modules" / ".bin"
PROMPTFOO = NODE_BIN / "promptfoo"

pytestmark = pytest.mark.django_db(transaction=True)


def promptfoo_or_skip() -> Path:
    """promptfoo as `make test` installs it (`make promptfoo`). Missing, the test fails in CI
    and wherever npm could have installed it; it skips only on a machine without npm."""
    if PROMPTFOO.exists():
        return PROMPTFOO
    if os.environ.get("CI") or shutil.which("npm"):
        pytest.fail("promptfoo is not installed under var/node: run `make promptfoo` (npm)")
    pytest.skip("promptfoo is not installed and there is no npm to install it")


def grade_sunny(text: str) -> str:
    """The fake vendor: a grading prompt (ours or promptfoo's) passes when the output it
    grades says "sunny"; anything else is echoed back."""
    match = re.search(r"<output>(.*?)</output>", text, re.I | re.S)
    if match and "rubric" in text.lower():
        passed = "sunny" in match[1].lower()
        return json.dumps({"pass": passed, "score": float(passed), "reason": "fake grader"})
    return "echo: " + text


def run_promptfoo(
    folder: Path, tmp_path: Path, base_url: str, *args: str
) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{NODE_BIN}:{os.environ['PATH']}",
        "HOME": str(home),
        "PROMPTFOO_CONFIG_DIR": str(home / ".promptfoo"),
        "PROMPTFOO_DISABLE_TELEMETRY": "1",
        "PROMPTFOO_DISABLE_UPDATE": "1",
        "PROMPTFOO_CACHE_ENABLED": "false",
        "PROMPTFOO_DISABLE_SHARING": "1",
        "OPENAI_API_KEY": "sk-dummy",
        # promptfoo's own default grader asks OpenAI: the fake vendor answers for it too.
        "OPENAI_BASE_URL": base_url,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    return subprocess.run(
        [str(promptfoo_or_skip()), *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_promptfoo_validates_and_runs_our_export_and_agrees_with_our_run(fake_llm, tmp_path):
    promptfoo_or_skip()
    fake_llm.reply_with(grade_sunny)
    provider = Provider.objects.create(
        name="Fake OpenAI", kind="openai", model="fake-1", base_url=fake_llm.base_url
    )
    import_project(ProjectFiles.from_folder(AGREE))
    folder = tmp_path / "export"
    call_command("export_cards", "--format", "promptfoo", str(folder), "--provider", provider.name)
    config = yaml.safe_load((folder / "promptfooconfig.yaml").read_text())
    assert sorted(p["label"] for p in config["prompts"]) == ["chat", "plain"]
    assert config["providers"] == [
        {
            "id": "openai:chat:fake-1",
            "label": "Fake OpenAI",
            "config": {"apiBaseUrl": fake_llm.base_url},
        }
    ]
    assert config["defaultTest"]["assert"] == [{"type": "javascript", "value": "output.length > 5"}]

    validated = run_promptfoo(
        folder, tmp_path, fake_llm.base_url, "validate", "-c", "promptfooconfig.yaml"
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    evaluated = run_promptfoo(
        folder,
        tmp_path,
        fake_llm.base_url,
        "eval",
        "-c",
        "promptfooconfig.yaml",
        "-o",
        "results.json",
        "--no-cache",
        "--no-progress-bar",
        "--no-table",
    )
    assert (folder / "results.json").exists(), evaluated.stdout + evaluated.stderr
    rows = json.loads((folder / "results.json").read_text())["results"]["results"]
    theirs = {
        (row["prompt"]["label"], row["testCase"]["description"]): bool(row["success"])
        for row in rows
    }

    ours = {}
    for card in PromptCard.objects.order_by("name"):
        run = run_in_this_thread(launching.launch_run(card=card, provider=provider))
        label = card.name.split(": ", 1)[1]
        for result in run.results.select_related("case"):
            ours[(label, result.case.name)] = result.status == "passed"

    assert len(theirs) == 2 * 9
    assert ours == theirs
    # Both ways of judging saw passes and failures, so agreeing says something.
    assert set(theirs.values()) == {True, False}


def test_export_of_an_import_comes_back_as_the_same_cards(tmp_path):
    import_project(ProjectFiles.from_folder(AGREE))
    before = {
        c.slug: (c.template, c.system_prompt, c.cases.count()) for c in PromptCard.objects.all()
    }
    call_command("export_cards", "--format", "promptfoo", str(tmp_path / "out"))
    archive = tmp_path / "out.zip"

    shutil.make_archive(str(archive.with_suffix("")), "zip", tmp_path / "out")

    report = import_cards(archive.read_bytes(), filename="out.zip")

    assert (report.cards_created, report.cards_updated, report.cases_updated) == (0, 0, 0)
    assert report.cases_unchanged == 2 * 9
    after = {
        c.slug: (c.template, c.system_prompt, c.cases.count()) for c in PromptCard.objects.all()
    }
    assert after == before
