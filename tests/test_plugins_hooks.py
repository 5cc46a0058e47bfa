"""One test per hook, named ``test_hook_<hook name>``, checking what docs/plugin-hooks.md says
about it: what it receives, what it returns, when it is called and what happens when it fails.
``tests/test_docs.py`` fails when a hook has no such test.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import Tensor, nn

from robustkit import Dataset, Defence, DefenceResult, Exporter, ExportResult, LoadedModel, ReportSection, RunConfig
from robustkit.attacks.base import Attack
from robustkit.audit.run import AuditConfig, run_audit
from robustkit.cli import cli
from robustkit.data import load_dataset
from robustkit.errors import DataError, RobustkitError
from robustkit.models.base import LoadOptions
from robustkit.models.loading import load_model
from robustkit.modules import Model
from robustkit.params import param
from robustkit.plugin.hookspecs import hookimpl
from robustkit.plugin.host import Host, PluginRecord
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

Register = Callable[..., PluginRecord]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


class Shift(Attack):
    """Adds eps to every input (a fake attack)."""

    name = "shift"
    norms = frozenset({Norm.LINF})

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        return x + threat.eps


def test_hook_robustkit_register_attacks(host: Host, register_plugin: Register) -> None:
    class Plugin:
        @hookimpl
        def robustkit_register_attacks(self, registry: Any) -> None:
            assert (registry.provider, registry.plugin) == ("mine", "my-plugin")
            registry.add(Shift)  # name and summary from the class
            registry.add(Shift, name="shift-again", aliases=("sa",), summary="the same, twice")

    class Clashing:
        @hookimpl
        def robustkit_register_attacks(self, registry: Any) -> None:
            registry.add(Shift, name="fine")
            registry.add(Shift)  # "clash:shift" is fine, but this provider adds it twice
            registry.add(Shift)

    assert register_plugin(Plugin(), "my-plugin", provider="mine").ok
    register_plugin(Clashing(), "clash")
    entry = host.attacks.resolve("mine:shift")
    assert (entry.obj, entry.plugin, entry.summary) == (Shift, "my-plugin", "Adds eps to every input (a fake attack).")
    assert host.attacks.resolve("sa").name == "shift-again"
    assert host.attacks.resolve("pgd").provider == "robustkit"  # a bare name prefers the built-in
    record = host.records["clash"]
    assert record.status.startswith("failed: DuplicateNameError: attack 'clash:shift' is registered twice")
    assert not host.attacks.list("clash:*")  # what a failed plugin registered is removed


@dataclass(frozen=True)
class ScaleParams:
    factor: float = param(0.5, "multiplies the inputs")


class Scale(Defence):
    """Scales the inputs down before the model (a fake transform defence)."""

    name = "scale"
    kind = "transform"
    Params = ScaleParams

    def apply(self, model: nn.Module, data: Dataset | None, *, threat: ThreatModel,
              run: RunConfig | None = None) -> DefenceResult:
        factor = self.params.factor

        class Scaled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: Tensor) -> Tensor:
                return self.model(x * factor)

        return DefenceResult(Scaled())


def test_hook_robustkit_register_defences(host: Host, register_plugin: Register) -> None:
    class Plugin:
        @hookimpl
        def robustkit_register_defences(self, registry: Any) -> None:
            registry.add(Scale)

    register_plugin(Plugin(), "scaler")
    cls = host.defences.resolve("scaler:scale").obj
    linear = nn.Linear(4, 2)
    defended = cls(factor=0.25)
    x = torch.ones(3, 4)
    assert torch.allclose(defended.apply(linear, None, threat=ThreatModel.parse("linf:0.1")).model(x), linear(x / 4))
    listed = {d["name"]: d for d in json.loads(invoke("defences", "list", "--json").stdout)}
    assert listed["scaler:scale"]["kind"] == "transform"
    shown = json.loads(invoke("defences", "show", "scaler:scale", "--json").stdout)
    assert [p["name"] for p in shown["params"]] == ["factor"]


class Nothing(Exporter):
    """Writes an empty file (a fake exporter)."""

    name = "nothing"
    suffix = ".nothing"

    def export(self, model: nn.Module, example: Tensor, path: Path, *, metadata: dict[str, Any]) -> ExportResult:
        path.write_bytes(b"")
        return ExportResult(path, self.name, [path])

    def load(self, path: Path, model: nn.Module) -> Model:
        return model


def test_hook_robustkit_register_exporters(host: Host, register_plugin: Register) -> None:
    class Plugin:
        @hookimpl
        def robustkit_register_exporters(self, registry: Any) -> None:
            registry.add(Nothing, aliases=("void",))

    class Broken:
        @hookimpl
        def robustkit_register_exporters(self, registry: Any) -> None:
            registry.add(Nothing, name="Not A Name")

    register_plugin(Plugin(), "nil")
    register_plugin(Broken(), "broken")
    assert host.exporters.resolve("void").obj is Nothing
    listed = {e["name"]: e for e in json.loads(invoke("exporters", "list", "--json").stdout)}
    assert listed["nil:nothing"]["suffix"] == ".nothing"
    assert host.records["broken"].status.startswith("failed: RobustkitError: exporter name 'Not A Name'")
    assert "robustkit:onnx" in listed  # the built-ins are untouched


def test_hook_robustkit_register_datasets(host: Host, register_plugin: Register) -> None:
    calls = []

    def tiny() -> Dataset:
        calls.append("tiny")
        return Dataset("tiny", torch.rand(6, 1, 4, 4), torch.arange(6) % 3, num_classes=3)

    def out_of_bounds() -> Dataset:
        return Dataset("loud", torch.full((2, 1, 4, 4), 255.0), torch.zeros(2, dtype=torch.long), num_classes=1)

    class Plugin:
        @hookimpl
        def robustkit_register_datasets(self, registry: Any) -> None:
            registry.add(tiny, name="tiny", summary="six random images")
            registry.add(out_of_bounds, name="loud")

    register_plugin(Plugin(), "toy")
    assert not calls  # registering stores the factory; it runs when the data set is asked for
    assert host.datasets.resolve("toy:tiny").summary == "six random images"
    assert load_dataset("toy:tiny").x.shape == (6, 1, 4, 4) and calls == ["tiny"]
    with pytest.raises(DataError, match=r"loud \(eval split\): values span \[255, 255\], outside the bounds"):
        load_dataset("loud")


def test_hook_robustkit_load_model(host: Host, register_plugin: Register) -> None:
    seen: list[tuple[str, LoadOptions]] = []

    class FakeFormat:
        @hookimpl
        def robustkit_load_model(self, ref: str, options: LoadOptions) -> LoadedModel | None:
            seen.append((ref, options))
            if not ref.endswith(".fake"):
                return None  # not ours: the next loader (here the built-in) is asked
            if "refuse" in ref:
                raise RobustkitError(f"{ref} is signed by an unknown key; pass --trust-code to load it anyway")
            return LoadedModel(nn.Flatten(), ref, "fake", "0" * 64)

    class Crashing:
        @hookimpl
        def robustkit_load_model(self, ref: str, options: LoadOptions) -> LoadedModel | None:
            if ref.endswith(".crash"):
                raise ValueError("bad header")
            return None

    register_plugin(Crashing(), "crashing")
    register_plugin(FakeFormat(), "fake")  # registered last: asked first
    loaded = load_model("model.fake", LoadOptions(mean=(0.5,), std=(0.25,)))
    assert loaded.format == "fake" and seen[0][0] == "model.fake" and seen[0][1].mean == (0.5,)
    assert type(loaded.model).__name__ == "Normalized"  # --mean/--std wrap whatever a loader returns
    assert load_model("builtin:digits-cnn").format == "builtin"  # None falls through to the built-in
    with pytest.raises(RobustkitError, match=r"^refuse.fake is signed by an unknown key; pass --trust-code"):
        load_model("refuse.fake")
    with pytest.raises(RobustkitError, match=r"^plugin 'crashing' failed in robustkit_load_model: ValueError: bad"):
        load_model("model.crash")


def test_hook_robustkit_report_sections(host: Host, register_plugin: Register, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    class Sections:
        @hookimpl
        def robustkit_report_sections(self, report: dict[str, Any]) -> list[ReportSection] | None:
            assert report["complete"] and report["results"]  # the finished report document
            return [ReportSection("Deployment", f"audited {report['n']} samples"), "not a section"]  # type: ignore[list-item]

    class Silent:
        @hookimpl
        def robustkit_report_sections(self, report: dict[str, Any]) -> list[ReportSection] | None:
            return None

    class Crashing:
        @hookimpl
        def robustkit_report_sections(self, report: dict[str, Any]) -> list[ReportSection] | None:
            raise KeyError("model")

    for plugin, name in ((Sections(), "sections"), (Silent(), "silent"), (Crashing(), "crashing")):
        register_plugin(plugin, name)
    weights = tmp_path / "cnn.safetensors"  # a trained model: an untrained one is at chance and not attacked
    save_file(trained_digits_model("cnn").state_dict(), str(weights))
    config = AuditConfig(str(weights), load=LoadOptions(arch="builtin:digits-cnn"), attacks=("fgsm",), eps=(0.1,),
                         limit=8, run_checks=False, out=tmp_path / "report")
    with caplog.at_level(logging.WARNING, logger="robustkit.plugin.host"):
        report = run_audit(config)
    assert report["sections"] == [{"title": "Deployment", "markdown": "audited 8 samples", "plugin": "sections"}]
    assert "plugin 'crashing' failed in robustkit_report_sections: KeyError: 'model'" in caplog.text
    assert "## Deployment\n\naudited 8 samples" in (tmp_path / "report" / "report.md").read_text()
    host.strict = True  # ROBUSTKIT_STRICT_PLUGINS=1: the crash propagates
    with pytest.raises(KeyError):
        run_audit(dataclasses.replace(config, out=None))


def test_hook_robustkit_register_commands(host: Host, register_plugin: Register,
                                          caplog: pytest.LogCaptureFixture) -> None:
    class Commands:
        @hookimpl
        def robustkit_register_commands(self, cli: click.Group) -> None:
            @cli.command()
            @click.argument("who")
            def greet(who: str) -> None:
                """Say hello."""
                click.echo(f"hello {who}")

            @cli.command(name="audit")
            def fake_audit() -> None:
                click.echo("not the real audit")

    register_plugin(Commands(), "greeter")
    with caplog.at_level(logging.WARNING, logger="robustkit"):
        help_text = invoke("--help").stdout
    assert "greet" in help_text and "Say hello." in help_text
    assert "a plugin command 'audit' clashes with a built-in command; the built-in wins" in caplog.text
    assert invoke("greet", "you").stdout == "hello you\n"
    assert "not the real audit" not in invoke("audit", "--help").stdout


def test_hook_robustkit_audit_job(host: Host, register_plugin: Register, tmp_path: Path) -> None:
    from robustkit.audit.report import Section
    from robustkit.audit.run import run_audit_report

    asked: list[str] = []

    class OwnAudit:
        @hookimpl
        def robustkit_audit_job(self, config: AuditConfig) -> Any:
            asked.append(config.data)
            if config.data == "refuse:me":
                raise RobustkitError("refuse:me is not readable; give a .csv")
            if config.data != "own:data":
                return None  # robustkit's engine runs it
            report = run_audit_report(dataclasses.replace(config, data="builtin:digits", out=None))
            own = dataclasses.replace(report, sections=(Section("Own", "the job's section", "own"),))
            return own, [{"index": 0, "label": 7, "clean_correct": True, "broken_at_eps": 2.0, "broken_by": "x",
                          "proven_robust_to_eps": ""}]

    class Sections:
        @hookimpl
        def robustkit_report_sections(self, report: dict[str, Any]) -> list[ReportSection] | None:
            return [ReportSection("Added", f"{len(report['sections'])} before")]

    register_plugin(OwnAudit(), "own")
    register_plugin(Sections(), "sections")
    weights = tmp_path / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(weights))
    config = AuditConfig(str(weights), data="own:data", load=LoadOptions(arch="builtin:digits-cnn"),
                         attacks=("fgsm",), eps=(0.1,), limit=8, run_checks=False, out=tmp_path / "report")
    report = run_audit(config)
    assert asked == ["own:data", "builtin:digits"]  # the job's own inner audit falls through to robustkit
    assert [(s["title"], s["plugin"]) for s in report["sections"]] == [("Own", "own"), ("Added", "sections")]
    assert (tmp_path / "report" / "per_sample.csv").read_text().splitlines()[1] == "0,7,True,2.0,x,"
    assert "## Own\n\nthe job's section" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(RobustkitError, match=r"^refuse:me is not readable; give a .csv$"):
        run_audit(dataclasses.replace(config, data="refuse:me", out=None))


def test_hook_robustkit_harden_job(host: Host, register_plugin: Register, tmp_path: Path) -> None:
    from robustkit import HardenRequest, run_harden

    class OwnHarden:
        @hookimpl
        def robustkit_harden_job(self, request: Any) -> dict[str, Any] | None:
            if not request.data.endswith(".txt"):
                return None
            if request.defence == "crash":
                raise ValueError("no tokenizer")
            (request.run.out_dir / "trained").write_text(request.defence)
            return {"defence": request.defence}

    register_plugin(OwnHarden(), "own")
    out = tmp_path / "run"
    request = HardenRequest("model", "data.txt", "fgm", run=RunConfig(out_dir=out, progress=False))
    assert run_harden(request) == {"defence": "fgm"} and (out / "trained").read_text() == "fgm"
    with pytest.raises(RobustkitError, match=r"^plugin 'own' failed in robustkit_harden_job: ValueError: no tokenizer"):
        run_harden(dataclasses.replace(request, defence="crash"))
    (out / "checkpoint.pt").write_bytes(b"")  # robustkit's own check runs before any job is asked
    with pytest.raises(RobustkitError, match="holds the checkpoint of an earlier run"):
        run_harden(request)
    with pytest.raises(RobustkitError, match="does not exist"):  # not the job's: robustkit's own harden
        run_harden(HardenRequest("builtin:digits-cnn", "missing.npz", "pgd-at", run=RunConfig(out_dir=tmp_path / "x")))


def test_hook_robustkit_export_job(host: Host, register_plugin: Register, tmp_path: Path) -> None:
    from robustkit import ExportConfig, run_export

    class OwnExport:
        @hookimpl
        def robustkit_export_job(self, config: Any) -> ExportResult | None:
            if not config.model.endswith(".txt"):
                return None  # robustkit's exporters
            if config.format == "crash":
                raise ValueError("no tokenizer")
            config.out.write_text(config.model)
            return ExportResult(config.out, config.format, [config.out], verified=True)

    register_plugin(OwnExport(), "own")
    config = ExportConfig("model.txt", format="own", out=tmp_path / "model.own")  # no exporter is named "own"
    result = run_export(config)
    assert result.verified and result.format == "own" and (tmp_path / "model.own").read_text() == "model.txt"
    with pytest.raises(RobustkitError, match=r"^plugin 'own' failed in robustkit_export_job: ValueError: no tokenizer"):
        run_export(dataclasses.replace(config, format="crash"))
    with pytest.raises(RobustkitError, match="unknown exporter 'own'"):  # not the job's: robustkit's own export
        run_export(dataclasses.replace(config, model="builtin:digits-cnn"))
