"""``robustkit export MODEL``: a verified deployment copy, with its robustness inside."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from robustkit.cli.common import data_for, load_options, model_options


@click.command()
@click.argument("model")
@model_options
@click.option("--format", "fmt", default="onnx", show_default=True,
              help="Exporter name (see `robustkit exporters list`), e.g. onnx or safetensors.")
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="A parameter of the exporter, e.g. -o opset 17 (see `robustkit exporters show NAME`).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file [default: exports/NAME.onnx, with the exporter's suffix].")
@click.option("--report", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An audit's report.json: the robustness summary to embed (it must be about MODEL).")
@click.option("--data", help="Data set whose evaluation split verifies the export (the audit's) "
              "[required, except for built-in models: builtin:digits].")
@click.option("--threat", type=click.Choice(["linf", "l2"]),
              help="Norm of the verification and quick summary [default: the report's, else linf].")
@click.option("--eps", help="Radius in input units, e.g. 8/255 [default: the report's middle eps, else 8/255 or 0.5].")
@click.option("--samples", default=512, show_default=True, help="Evaluation samples used to verify.")
@click.option("--no-audit", is_flag=True, help="Without --report, embed no robustness summary (skips the PGD run).")
@click.option("--force", is_flag=True, help="Replace an existing --out file that robustkit did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
def export(model: str, arch: str | None, trust_code: bool, mean: str | None, std: str | None, device: str,
           fmt: str, options: tuple[tuple[str, str], ...], out: Path | None, report: Path | None, data: str | None,
           threat: str | None, eps: str | None, samples: int, no_audit: bool, force: bool, as_json: bool) -> None:
    """Export MODEL for deployment, verify the copy against torch on real data, embed its robustness."""
    from robustkit.export.run import ExportConfig, run_export
    from robustkit.threat import Norm, parse_number

    config = ExportConfig(
        model=model, format=fmt, out=out, options=options, load=load_options(arch, trust_code, mean, std, device),
        data=data_for(data, model, arch), report=report, norm=Norm.parse(threat) if threat else None,
        eps=parse_number(eps) if eps else None, audit=not no_audit, samples=samples, force=force,
    )
    result = run_export(config).as_dict()
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        print_result(result)


def print_result(result: dict[str, Any]) -> None:
    from rich.markup import escape

    from robustkit.console import stdout

    checks, details = result["checks"], result["details"]
    how = f" via the {details['exporter']} exporter, opset {details['opset']}" if "exporter" in details else ""
    stdout.print(f"[bold]{result['path']}[/] ({result['format']}{how}) written and verified on {checks['samples']} "
                 f"samples")
    if "dynamo_failed" in details:
        stdout.print(f"  written by torch's TorchScript-based ONNX exporter; the newer dynamo exporter was tried "
                     f"first and not used: {details['dynamo_failed']}")
    if "tokenizer" in details:  # a text export's
        stdout.print(f"  its tokenizer: {details['tokenizer']}/ (AutoTokenizer.from_pretrained)")
    lengths = f" and sequence lengths {', '.join(map(str, checks['sequence_lengths']))}" if (
        "sequence_lengths" in checks) else ""  # a text export's
    stdout.print(f"  outputs: max abs diff {checks['max_abs_diff']:.2g} at batch sizes "
                 f"{', '.join(map(str, checks['batch_sizes']))}{lengths}; "
                 f"argmax agreement {100 * checks['argmax_agreement']:.0f}%")
    if "parity_attack" in checks:  # every exporter that attacks its graph (images: PGD, text: HotFlip)
        figures = (f"robust accuracy {100 * checks['robust_accuracy_torch']:.1f}% torch vs "
                   f"{100 * checks['robust_accuracy_exported']:.1f}% exported")
        if checks.get("parity_broken") == 0:  # both ran inputs that fool neither: nothing was compared
            stdout.print(f"  adversarial parity ({checks['parity_attack']}) [yellow]untested: the attack broke no "
                         f"sample[/] ({figures})")
        else:
            stdout.print(f"  adversarial parity ({checks['parity_attack']}): {figures} "
                         f"(gap {100 * checks['parity_gap']:.2f} points)")
    robustness = result["metadata"].get("robustness")
    if robustness:
        norm = robustness["threat"]["norm"]
        worst = ", ".join(f"{100 * r['robust_accuracy']:.1f}% at {norm} eps {r['eps']:g}"
                          for r in robustness["worst_case"])
        suite = f", suite {robustness['suite']['name']}" if robustness.get("suite", {}).get("name") else ""
        stdout.print(f"  embedded robustness ({robustness['source']}{suite}): "
                     f"clean {100 * robustness['clean_accuracy']:.1f}%, worst case {worst}")
        for caveat in robustness.get("caveats", []):  # embedded beside the figures (export/run.py)
            style = "bold red" if caveat["level"] == "fail" else "yellow"
            stdout.print(f"    [{style}]{escape(caveat['text'])}[/]")
    for warning in result["warnings"]:
        stdout.print(f"[yellow]warning[/] {warning}")
