"""``robustkit compare A/report.json B/report.json``: two audits side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from robustkit.audit.compare import Comparison


@click.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write comparison.json and comparison.png to DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON document.")
@click.option("--force", is_flag=True,
              help="Compare audits of different data, threat, attacks or attack parameters anyway.")
def compare(a: Path, b: Path, out: Path | None, as_json: bool, force: bool) -> None:
    """Compare audit B with audit A (report.json, or the folder holding it): robust accuracy per eps,
    the difference B - A and its significance, and the checks that changed status."""
    from robustkit.audit.compare import AuditsDiffer, compare_reports, load_audit, write_comparison
    try:
        comparison = compare_reports(load_audit(a), load_audit(b), force=force)
    except AuditsDiffer as err:  # one line, as click's usage errors exit (2), without the usage text
        click.echo(f"Error: {err}", err=True)
        raise click.exceptions.Exit(AuditsDiffer.exit_code) from None
    if out is not None:
        write_comparison(comparison, out)
    if as_json:
        click.echo(json.dumps(comparison.to_json_dict(), indent=2))
    else:
        print_comparison(comparison, out)


def print_comparison(comparison: Comparison, out: Path | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from robustkit.console import stdout

    def share(value: float | None, interval: tuple[float, float] | None) -> str:
        if value is None or interval is None:
            return "n/a"
        return f"{100 * value:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"

    stdout.print(f"A: {escape(comparison.a.label)} ({escape(comparison.a.model)}), n = {comparison.n[0]}")
    stdout.print(f"B: {escape(comparison.b.label)} ({escape(comparison.b.model)}), n = {comparison.n[1]}")
    table = Table("eps", "A", "B", "B - A", "p", "test", title=f"worst-case robust accuracy ({comparison.norm})")
    for row in comparison.rows:
        difference = "n/a" if row.difference is None else f"{100 * row.difference:+.1f}"
        p_value = "" if row.p_value is None else f"{row.p_value:.3g}" + (" *" if row.significant else "")
        table.add_row(row.name, share(row.a, row.a_ci95), share(row.b, row.b_ci95),
                      f"[bold]{difference}[/]" if row.significant else difference, p_value, row.test)
    stdout.print(table)
    for change in comparison.checks:
        stdout.print(f"check {escape(change.name)}: {change.a} -> {change.b}")
    if out is not None:
        stdout.print(f"comparison written to {out}/comparison.png (and comparison.json)")
    for line in comparison.lines():
        style = "bold red" if line == comparison.mixed_budgets else "bold"  # mixed budgets: loud
        stdout.print(f"[{style}]{escape(line)}[/]")
