"""``robustkit badge report.json -o badge.svg``: the headline figure as an SVG badge."""
from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("report", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("badge.svg"),
              show_default=True, help="The SVG file to write.")
def badge(report: Path, output: Path) -> None:
    """Write the badge of REPORT (report.json, or the folder holding it): "robust acc. @ 8/255: 45%"."""
    from robustkit.audit.report import badge_svg, read_report
    from robustkit.errors import RobustkitError
    from robustkit.io import atomic_write

    document = read_report(report / "report.json" if report.is_dir() else report)
    if "summary" not in document:
        raise RobustkitError(f"{report} has schema {document['schema_version']}, without a summary; "
                             "audit the model again with this robustkit")
    atomic_write(output, badge_svg(document["summary"]["badge"]))
    click.echo(f"badge written to {output}: {document['summary']['badge']['label']}: "
               f"{document['summary']['badge']['value']}")
