"""report.json against its JSON Schema (robustkit/audit/report_schema.json): the reports of real
audits, complete and partial, validate; reports with a key missing or of the wrong type do not.

jsonschema is no dependency, so ``validate`` below implements the part of JSON Schema that the
schema uses (``test_schema_uses_only_what_the_validator_checks`` keeps it that way).
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import robustkit.audit.run as audit_run
from robustkit.attacks.native import PGD
from robustkit.audit.checks import Status
from robustkit.audit.report import REPORT_NORMS, REQUIRED_KEYS, SCHEMA_PATH, SCHEMA_VERSION
from robustkit.cli import cli

Schema = dict[str, Any]

#: Keywords ``validate`` checks, and those it may ignore (annotations).
CHECKED = {"type", "enum", "required", "properties", "additionalProperties", "items", "anyOf", "$ref",
           "minItems", "maxItems", "minimum", "maximum"}
ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}
TYPES: dict[str, Callable[[Any], bool]] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def validate(instance: Any, schema: Schema, root: Schema | None = None, path: str = "$") -> list[str]:
    """The ways ``instance`` breaks ``schema`` (empty: it is valid)."""
    root = schema if root is None else root
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return validate(instance, target, root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[t](instance) for t in types):
            return [f"{path}: {type(instance).__name__} {instance!r:.40} is not {' or '.join(types)}"]
    errors = []
    if "enum" in schema and not any(instance == e and type(instance) is type(e) for e in schema["enum"]):
        errors.append(f"{path}: {instance!r:.40} is not one of {schema['enum']}")
    if "anyOf" in schema and all(validate(instance, s, root, path) for s in schema["anyOf"]):
        errors.append(f"{path}: {instance!r:.40} matches none of anyOf")
    if TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} < {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} > {schema['maximum']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems", len(instance)):
            errors.append(f"{path}: {len(instance)} items")
        for i, item in enumerate(instance):
            errors += validate(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(instance, dict):
        errors += [f"{path}: {key!r} is missing" for key in schema.get("required", []) if key not in instance]
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in properties:
                errors += validate(value, properties[key], root, f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: {key!r} is not allowed")
            elif isinstance(extra, dict):
                errors += validate(value, extra, root, f"{path}.{key}")
    return errors


@pytest.fixture(scope="module")
def schema() -> Schema:
    return json.loads(SCHEMA_PATH.read_text())


def invoke_audit(weights: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, ["audit", str(weights), "--arch", "builtin:digits-cnn", "--eps", "0.05,0.1",
                                    *args])


@pytest.fixture(scope="module")
def complete(cnn_weights: Path, builtin_host: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A small real audit with every kind of row: white-box and gradient-free attacks, checks,
    certificates. Its ``--json`` output and the folder it wrote."""
    out = tmp_path_factory.mktemp("complete")
    result = invoke_audit(cnn_weights, "--limit", "40", "--attack", "fgsm", "--attack", "pgd", "--attack", "square",
                          "-o", "steps", "5", "-o", "queries", "50", "--check-samples", "16", "--out", str(out),
                          "--json")
    assert result.exit_code in (0, 3), result.output  # 3: a check failed, which this test does not judge
    return result.stdout, out


@pytest.fixture
def report(complete: tuple[str, Path]) -> dict[str, Any]:
    return json.loads((complete[1] / "report.json").read_text())


def test_schema_uses_only_what_the_validator_checks(schema: Schema) -> None:
    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if path.endswith((".properties", ".$defs")):  # names, not keywords
                    yield from walk(value, f"{path}.{key}")
                    continue
                if key not in CHECKED | ANNOTATIONS:
                    yield f"{path}.{key}"
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{path}[{i}]")

    assert not list(walk(schema, "$"))
    assert set(REQUIRED_KEYS) <= set(schema["required"])
    assert schema["properties"]["schema_version"]["enum"] == [SCHEMA_VERSION]
    assert schema["$defs"]["check"]["properties"]["status"]["enum"] == list(typing.get_args(Status))
    assert schema["$defs"]["norm"]["enum"] == list(REPORT_NORMS)


def test_a_complete_report_matches_the_schema(schema: Schema, complete: tuple[str, Path],
                                              report: dict[str, Any]) -> None:
    stdout, out = complete
    assert stdout == (out / "report.json").read_text() + "\n"  # --json prints report.json
    assert validate(report, schema) == []
    assert report["complete"] is True and report["sections"] == []
    assert {r["gradients"] for r in report["results"]} == {True, False}
    assert any(r["certified_accuracy"] is not None for r in report["worst_case"])
    assert len(report["checks"]) > 1


def test_partial_reports_match_the_schema(schema: Schema, cnn_weights: Path, builtin_host: None, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The report written after each (attack, eps), and the one an interruption leaves."""
    partial: list[dict[str, Any]] = []
    write_report = audit_run.write_report

    def recording(report: Any, out: Path, *args: Any, render: bool = True, **kwargs: Any) -> None:
        write_report(report, out, *args, render=render, **kwargs)
        if not render:
            partial.append(json.loads((out / "report.json").read_text()))

    calls = {"n": 0}
    run = PGD.run

    def interrupting(self: PGD, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return run(self, *args, **kwargs)

    monkeypatch.setattr(audit_run, "write_report", recording)
    monkeypatch.setattr(PGD, "run", interrupting)
    out = tmp_path / "partial"
    result = invoke_audit(cnn_weights, "--limit", "40", "--attack", "fgsm", "--attack", "pgd", "--no-certify",
                          "--out", str(out))
    assert result.exit_code == 130, result.output
    interrupted = json.loads((out / "report.json").read_text())
    assert partial and all(r["complete"] is False for r in [*partial, interrupted])
    assert {(r["attack"], r["eps"]) for r in interrupted["results"]} == {
        ("robustkit:fgsm", 0.05), ("robustkit:fgsm", 0.1), ("robustkit:pgd", 0.05)}
    assert [r["certified_accuracy"] for r in interrupted["worst_case"]] == [None]  # only eps 0.05 completed
    for document in [*partial, interrupted]:
        assert validate(document, schema) == []


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda r: r.pop(key)


BREAKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    **{f"no {key}": _without(key) for key in ("schema_version", "results", "worst_case", "checks", "config")},
    "n is a string": lambda r: r.update(n="40"),
    "complete is 0": lambda r: r.update(complete=0),
    "another schema version": lambda r: r.update(schema_version="2.0"),
    "a result row without ci95": lambda r: r["results"][0].pop("ci95"),
    "a three-number ci95": lambda r: r["results"][0]["ci95"].append(0.5),
    "an accuracy above 1": lambda r: r["results"][0].update(robust_accuracy=1.5),
    "attacked is a float": lambda r: r["results"][0].update(attacked=3.0),
    "an unknown scope": lambda r: r["results"][0].update(scope="all"),
    "notes that are not strings": lambda r: r["results"][0].update(notes=[1]),
    "certified accuracy as text": lambda r: r["worst_case"][0].update(certified_accuracy="0.5"),
    "an unknown check status": lambda r: r["checks"][0].update(status="ok"),
    "a check with another key": lambda r: r["checks"][0].update(extra=1),
    "threat without a norm": lambda r: r["threat"].pop("norm"),
    "model without a sha256": lambda r: r["model"].pop("sha256"),
    "a suite without its attacks": lambda r: r["config"]["suite"].pop("attacks"),
    "a section without a title": lambda r: r["sections"].append({"markdown": "", "plugin": "p"}),
    "no summary": _without("summary"),
    "a summary without its verdict": lambda r: r["summary"].pop("verdict"),
    "an unknown trust": lambda r: r["summary"].update(trust="fine"),
    "a summary row without ci95": lambda r: r["summary"]["worst_case"][0].pop("ci95"),
    "a badge with another key": lambda r: r["summary"]["badge"].update(extra=1),
    "a headline of one line": lambda r: r["summary"].update(headline=["verdict: fine"]),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_broken_report_fails_the_schema(schema: Schema, report: dict[str, Any], name: str) -> None:
    broken = copy.deepcopy(report)
    BREAKS[name](broken)
    assert validate(broken, schema), name


def test_rows_may_carry_notes_and_reports_may_grow(schema: Schema, report: dict[str, Any]) -> None:
    grown = copy.deepcopy(report)
    grown["results"][0]["notes"] = ["square ran as a nested search"]
    grown["worst_case"][0]["later"] = True
    grown["later"] = {"any": "thing"}
    assert validate(grown, schema) == []
