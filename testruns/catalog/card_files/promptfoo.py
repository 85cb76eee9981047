"""promptfoo's config format: a test (which our own format uses too), defaultTest, and prompts,
one card per prompt with every test."""

from __future__ import annotations

from typing import Any

from django.utils.text import slugify

from testruns.catalog.card_files.reading import CardSpec, CaseSpec, Defaults, Reader, at, kind_of

LIST_VAR_MESSAGE = (
    "promptfoo runs a test once per item of a list; that is not supported here: "
    "write one test per value"
)
# promptfoo's `options` and `metadata` are accepted and ignored: nothing here reads them.
TEST_KEYS = {"description", "vars", "assert", "threshold", "tags", "enabled", "options", "metadata"}
TEST_FIELD_KEYS = {"name": "description", "variables": "vars", "threshold": "threshold"}
TEST_FIELD_KEYS |= {"tags": "tags", "enabled": "enabled"}


def read_test(
    reader: Reader, item: Any, where: str, n: int, promptfoo: bool, defaults: Defaults
) -> CaseSpec | None:
    """One test as a CaseSpec, or None when it is not even a mapping."""
    if not isinstance(item, dict):
        reader.add(where, f"a test must be a mapping, got a {kind_of(item)}")
        return None
    for key in item.keys() - TEST_KEYS:
        reader.add(at(where, key), f"unknown key; expected one of {', '.join(sorted(TEST_KEYS))}")
    variables = reader.get(item, "vars", "mapping", where, {})
    assertions = reader.get(item, "assert", "list", where, [])
    if promptfoo:
        reader.file_refs({"vars": variables, "assert": assertions}, where)
        for name in [name for name, value in variables.items() if isinstance(value, list)]:
            reader.add(at(at(where, "vars"), name), LIST_VAR_MESSAGE)
        assertions = [_without_metric(spec) for spec in assertions]
    fields = {
        "name": reader.get(item, "description", "string", where, f"test {n}"),
        "variables": defaults.variables | variables,
        "assertions": defaults.assertions + assertions,
        "threshold": reader.get(item, "threshold", "number", where, defaults.threshold),
    }
    # Our own format says everything about a case; promptfoo has no tags or enabled flag,
    # so a promptfoo file leaves those as they are.
    if not promptfoo or "tags" in item:
        fields["tags"] = reader.get(item, "tags", "list", where, [])
    if not promptfoo or "enabled" in item:
        fields["enabled"] = reader.get(item, "enabled", "boolean", where, True)
    assert_where = [at(at(where, "assert"), i) for i in range(len(assertions))]
    field_where = {name: at(where, key) for name, key in TEST_FIELD_KEYS.items()}
    return CaseSpec(where, fields, defaults.assert_where + assert_where, field_where)


def read_tests(
    reader: Reader, tests: Any, where: str, promptfoo: bool, defaults: Defaults
) -> list[CaseSpec]:
    if promptfoo and isinstance(tests, str) and tests.startswith("file://"):
        reader.file_refs(tests, where, "tests")
    elif not isinstance(tests, list):
        reader.add(where, f"must be a list of tests, got a {kind_of(tests)}")
    else:
        specs = (
            read_test(reader, t, at(where, i), i + 1, promptfoo, defaults)
            for i, t in enumerate(tests)
        )
        return [spec for spec in specs if spec is not None]
    return []


def read_prompt(reader: Reader, prompt: Any, where: str) -> tuple[str, str]:
    """(template, label) from a string or a promptfoo `{raw, label, id}` object."""
    text, label = prompt, ""
    if isinstance(prompt, dict):
        where = at(where, "raw" if "raw" in prompt else "id")
        text, label = prompt.get("raw", prompt.get("id")), prompt.get("label") or ""
    if isinstance(text, str) and text.startswith("file://"):
        reader.file_refs(text, where, "prompt")
    elif not isinstance(text, str) or not isinstance(label, str):
        reader.add(where, "a prompt must be text, or a mapping with `raw:` text and `label:`")
    return (text if isinstance(text, str) else ""), str(label)


def _read_defaults(reader: Reader, default: Any) -> Defaults:
    if isinstance(default, str):
        reader.file_refs(default, "defaultTest", "default test")
    elif default is not None and (
        spec := read_test(reader, default, "defaultTest", 0, True, Defaults())
    ):
        variables, assertions = spec.fields["variables"], spec.fields["assertions"]
        return Defaults(variables, assertions, spec.assert_where, spec.fields["threshold"])
    return Defaults()


def read_config(reader: Reader, data: dict, stem: str) -> list[CardSpec]:
    """One card per prompt, each with every test. A card is named after its prompt's label,
    else the config's description, else the file, numbered when there are several."""
    prompts = data.get("prompts")
    prompts = [prompts] if isinstance(prompts, str | dict) else prompts
    if not isinstance(prompts, list) or not prompts:
        reader.add("prompts", "must be a list with at least one prompt")
        return []
    description = reader.get(data, "description", "string", "", "")
    defaults = _read_defaults(reader, data.get("defaultTest"))
    cases = read_tests(reader, data.get("tests", []), "tests", True, defaults)
    read = [read_prompt(reader, prompt, at("prompts", i)) for i, prompt in enumerate(prompts)]
    base = description or stem
    numbered = [f"{base} {i}" for i in range(1, len(read) + 1)] if len(read) > 1 else [base]
    names = [(label or number)[:200] for (_, label), number in zip(read, numbered, strict=True)]
    specs = []
    for i, ((template, _), name, slug) in enumerate(
        zip(read, names, _unique_slugs(names), strict=True)
    ):
        fields = {"name": name, "slug": slug, "template": template}
        fields |= {"description": description} if description else {}
        where, context = at("prompts", i), at("prompts", i) if len(read) > 1 else ""
        specs.append(CardSpec(where, fields, cases, {"template": where}, context=context))
    return specs


def _without_metric(spec: Any) -> Any:
    # promptfoo's `metric` only names a score in its reports; nothing here would read it.
    return {k: v for k, v in spec.items() if k != "metric"} if isinstance(spec, dict) else spec


def _unique_slugs(names: list[str]) -> list[str]:
    slugs: list[str] = []
    for name in names:
        base = slugify(name)[:190] or "card"
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.append(slug)
    return slugs
