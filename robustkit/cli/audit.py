"""``robustkit audit MODEL --data DATA``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from robustkit.audit.suites import SUITES
from robustkit.cli.common import data_for, load_options, model_options, option_pairs


@click.command()
@click.argument("model")
@click.option("--data", help="builtin:NAME, a .npz with x and y, or an image folder "
              "[required, except for built-in models: builtin:digits].")
@model_options
@click.option("--suite", default="default", show_default=True, type=click.Choice(list(SUITES)),
              help="Named attack suite (`robustkit suites list`); --attack replaces it.")
@click.option("--attack", "attacks", multiple=True, help="Attack name (repeatable); replaces the suite.")
@click.option("--threat", type=click.Choice(["linf", "l2", "l1"]), default="linf", show_default=True)
@click.option("--eps", help="Comma-separated eps in input units, e.g. 2/255,8/255 (default: per norm).")
@option_pairs
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write report files to DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option("--limit", type=click.IntRange(min=1), help="Audit only the first N evaluation samples.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Autocast for attack gradients; success is always judged in fp32.")
@click.option("--mode", type=click.Choice(["cascade", "per-attack"]), default="cascade", show_default=True,
              help="cascade: each attack runs on the survivors of the earlier ones (fast worst case); "
                   "per-attack: every attack on every sample (each attack's own accuracy).")
@click.option("--check-samples", default=128, show_default=True, help="Samples for the sanity checks.")
@click.option("--no-checks", is_flag=True, help="Skip the sanity checks (not recommended).")
@click.option("--black-box", is_flag=True,
              help="Attack through scores only (an ONNX model in onnxruntime, without a torch conversion).")
@click.option("--certify/--no-certify", default=True, show_default=True,
              help="Prove samples robust by bound propagation (Sequential ReLU nets) and skip attacking them.")
def audit(model: str, data: str | None, arch: str | None, trust_code: bool, mean: str | None, std: str | None,
          device: str, suite: str, attacks: tuple[str, ...], threat: str, eps: str | None,
          options: tuple[tuple[str, str], ...],
          out: Path | None, as_json: bool, limit: int | None, batch_size: int, seed: int, precision: str,
          mode: str, check_samples: int, no_checks: bool, black_box: bool,
          certify: bool) -> None:
    """Measure MODEL's clean and robust accuracy, with checks that catch gradient masking."""
    from robustkit.audit.run import AuditConfig, parse_eps_list, run_audit
    from robustkit.environment import warn_if_cpu_busy
    from robustkit.threat import Norm

    config = AuditConfig(
        model=model, data=data_for(data, model, arch), load=load_options(arch, trust_code, mean, std, device),
        attacks=attacks, suite=suite,
        options=options, norm=Norm.parse(threat), eps=parse_eps_list(eps) if eps else (), limit=limit,
        batch_size=batch_size, seed=seed, precision=precision, mode=mode,  # type: ignore[arg-type]
        check_samples=check_samples, run_checks=not no_checks, black_box=black_box, out=out,
        certify=certify,
    )
    warn_if_cpu_busy(device)
    report = run_audit(config)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        print_summary(report, out)
    if not report["complete"]:
        raise click.exceptions.Exit(130)
    if any(c["status"] == "fail" for c in report["checks"]):
        raise click.exceptions.Exit(3)


def print_summary(report: dict[str, Any], out: Path | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from robustkit.console import stdout
    from robustkit.threat import eps_text

    colours = {"pass": "green", "warn": "yellow", "fail": "red", "untested": "cyan"}
    caveat = report["config"]["suite"]["caveat"]
    if caveat:
        stdout.print(f"[bold yellow]{caveat}[/]")
    for note in report.get("notes", []):  # what ran differently, e.g. the gradient-free shortcut
        stdout.print(f"[yellow]note[/] {note}")
    stdout.print(f"[bold]{report['model']['source']}[/] on {report['data']['name']}: n = {report['n']}, "
                 f"clean accuracy {100 * report['clean_accuracy']:.1f}%  ({report['attack_access']})")
    table = Table("attack", "eps", "robust acc.", "95% CI", "s",
                  title="robust accuracy" + (" (cumulative, cascade)" if report["mode"] == "cascade" else ""))
    for row in report["results"]:
        table.add_row(row["attack"], eps_text(row["eps"]), f"{100 * row['robust_accuracy']:.1f}%",
                      f"{100 * row['ci95'][0]:.1f}-{100 * row['ci95'][1]:.1f}", f"{row['seconds']:.1f}")
    for row in report["worst_case"]:
        table.add_row("[bold]worst case", eps_text(row["eps"]), f"[bold]{100 * row['robust_accuracy']:.1f}%",
                      f"{100 * row['ci95'][0]:.1f}-{100 * row['ci95'][1]:.1f}", "")
    for row in report["worst_case"]:
        if row.get("certified_accuracy") is not None:
            table.add_row("certified (proven)", eps_text(row["eps"]), f"{100 * row['certified_accuracy']:.1f}%",
                          f"{100 * row['certified_ci95'][0]:.1f}-{100 * row['certified_ci95'][1]:.1f}", "")
    stdout.print(table)
    certification = report["certification"]
    stdout.print(f"certification: {certification['method']} ({certification['seconds']:.1f} s)")
    for check in report["checks"]:
        colour = colours.get(check["status"], "white")
        stdout.print(f"[{colour}]{check['status']:>4}[/] {check['name']}: {check['detail']}")
    if out is not None:
        stdout.print(f"report written to {out}/report.html (and report.json, report.md, per_sample.csv, badge.svg)")
    # the headline last, where the eye lands: the verdict (what weakens the figures first), the figures
    summary = report["summary"]
    colour = {"pass": "green", "warn": "yellow"}.get(summary["trust"], "red")
    verdict, *figures = summary["headline"]
    stdout.print(f"[bold {colour}]{escape(verdict)}[/]")
    for line in figures:
        stdout.print(f"[bold]{escape(line)}[/]")
