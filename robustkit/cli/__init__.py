"""The ``robustkit`` command line (click).

Results go to stdout (``--json``: exactly one JSON document), logs and progress to stderr.
A ``RobustkitError`` is printed as one line with exit code 1; usage errors exit 2 as click
does; tracebacks only with ``-v``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from robustkit import __version__

log = logging.getLogger("robustkit")


def _host(ctx: click.Context) -> Any:
    """The plugin host, configured once from the group's ``--plugins-dir`` options."""
    from robustkit.plugin import host as host_module

    root = ctx.find_root()
    meta = root.meta
    if "robustkit.plugin.host" not in meta:
        dirs = root.params.get("plugins_dirs") or ()
        meta["robustkit.plugin.host"] = host_module.configure(dirs) if dirs else host_module.get_host()
    return meta["robustkit.plugin.host"]


class RobustkitGroup(click.Group):
    """Adds plugin commands lazily and turns errors into one line and an exit code."""

    def _plugin_group(self, ctx: click.Context) -> click.Group:
        meta = ctx.find_root().meta
        if "robustkit.plugin_commands" not in meta:
            group = click.Group()
            _host(ctx).register_commands(group)
            for name in list(group.commands):
                if name in self.commands:
                    log.warning("a plugin command %r clashes with a built-in command; the built-in wins", name)
                    del group.commands[name]
            meta["robustkit.plugin_commands"] = group
        return meta["robustkit.plugin_commands"]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugin_group(ctx).commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or self._plugin_group(ctx).commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        from robustkit.errors import RobustkitError, one_line

        try:
            return super().invoke(ctx)
        except RobustkitError as err:
            if ctx.params.get("verbose"):
                raise
            if err.exit_code == 2:  # one line, as "Error: ...", exit 2
                raise click.UsageError(str(err)) from None
            if err.exit_code != 1:
                click.echo(f"Error: {err}", err=True)
                raise click.exceptions.Exit(err.exit_code) from None
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            # Jobs that have results to save catch Ctrl-C themselves and save them; one that
            # reaches here was interrupted before it had anything to write.
            click.echo("Error: interrupted before any result was written", err=True)
            raise click.exceptions.Exit(130) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as err:  # a read-only folder, --out under a file, a full disk: the path and the cause
            if ctx.params.get("verbose"):
                raise
            where = err.filename or "a file"
            raise click.ClickException(
                f"cannot read or write {where}: {err.strerror or err} (run with -v for the traceback)"
            ) from None
        except Exception as err:
            if ctx.params.get("verbose"):
                raise
            raise click.ClickException(f"internal error: {one_line(err)} (run with -v for the traceback)") from None


@click.group(cls=RobustkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robustkit")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and full tracebacks.")
@click.option("--plugins-dir", "plugins_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Load every *.py file of DIR as a one-off plugin (repeatable).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, plugins_dirs: tuple[str, ...]) -> None:
    """Audit and harden the adversarial robustness of PyTorch models."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _host(ctx)


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List loaded plugins, where they come from and whether they work."""
    root = ctx.find_root().command
    if isinstance(root, RobustkitGroup):
        root._plugin_group(ctx)  # command hooks run lazily: run them so that their failures show
    records = _host(ctx).plugins()
    rows = [{"name": r.name, "provider": r.provider, "source": r.source, "status": r.status, "hooks": r.hooks}
            for r in records]
    if as_json:
        emit_json(rows)
        return
    from rich.table import Table

    from robustkit.console import stdout

    table = Table("plugin", "provider", "status", "source", "hooks")
    for row in rows:
        style = "red" if row["status"].startswith("failed") else ("dim" if row["status"] == "disabled" else "")
        table.add_row(row["name"], row["provider"], row["status"], row["source"], ", ".join(row["hooks"]), style=style)
    stdout.print(table)


def describe_entry(entry: Any) -> dict[str, Any]:
    """One registry entry as a JSON-ready dict; keys depend on what the object declares."""
    obj = entry.obj
    info: dict[str, Any] = {"name": entry.qualified_name, "provider": entry.provider,
                            "aliases": list(entry.aliases), "summary": entry.summary}
    if hasattr(obj, "norms"):  # attacks, and defences that declare the norms they train for
        info["norms"] = sorted(n.value for n in obj.norms)
    for key, attr in (("targeted", "supports_targeted"), ("gradients", "needs_gradients"),
                      ("per_sample_eps", "per_sample_eps")):
        if hasattr(obj, attr):
            info[key] = bool(getattr(obj, attr))
    if hasattr(obj, "kind") and isinstance(getattr(obj, "kind", None), str):
        info["kind"] = obj.kind
    elif entry.kind == "dataset":  # a data-set factory makes robustkit's image Dataset unless it says otherwise
        info["kind"] = "image"
    if hasattr(obj, "suffix"):
        info["suffix"] = obj.suffix
    return info


def _registry_group(plural: str, singular: str) -> click.Group:
    """``robustkit <plural> list|show``: one implementation for every registry."""

    @click.group(name=plural, help=f"List and inspect registered {plural}.")
    def group() -> None:
        pass

    @group.command("list", help=f"List {plural}, optionally matching a shell-style PATTERN (e.g. 'art:*').")
    @click.argument("pattern", default="*")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
    @click.pass_context
    def list_command(ctx: click.Context, pattern: str, as_json: bool) -> None:
        entries = [describe_entry(e) for e in _host(ctx).registries[plural].list(pattern)]
        if as_json:
            emit_json(entries)
            return
        from rich.table import Table

        from robustkit.console import stdout

        columns = [k for k in ("name", "aliases", "norms", "targeted", "gradients", "kind", "suffix", "summary")
                   if any(k in e for e in entries)] or ["name"]
        table = Table(*columns)
        for e in entries:
            table.add_row(*[_cell(e.get(c, "")) for c in columns])
        stdout.print(table if entries else f"no {plural} match {pattern!r}")

    @group.command("show", help=f"Show one {singular} and its parameters.")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
    @click.pass_context
    def show_command(ctx: click.Context, name: str, as_json: bool) -> None:
        from robustkit.params import describe

        entry = _host(ctx).registries[plural].resolve(name)
        info = describe_entry(entry)
        params_cls = getattr(entry.obj, "Params", None)
        info["params"] = [vars(p) for p in describe(params_cls)] if params_cls else []
        if as_json:
            emit_json(info)
            return
        from rich.table import Table

        from robustkit.console import stdout

        for key, value in info.items():
            if key != "params":
                stdout.print(f"[bold]{key}[/]: {_cell(value)}")
        if info["params"]:
            table = Table("parameter", "type", "default", "help")
            for p in info["params"]:
                table.add_row(p["name"], p["type"], _cell(p["default"]), p["help"])
            stdout.print(table)

    return group


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


for _plural, _singular in (("attacks", "attack"), ("defences", "defence"), ("exporters", "exporter"),
                           ("datasets", "dataset")):
    cli.add_command(_registry_group(_plural, _singular))


@cli.group()
def suites() -> None:
    """List and inspect the named attack suites of `robustkit audit --suite`."""


@suites.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def suites_list(as_json: bool) -> None:
    """List the suites."""
    from robustkit.audit.suites import SUITES

    if as_json:
        emit_json([s.describe() for s in SUITES.values()])
        return
    from rich.table import Table

    from robustkit.console import stdout

    table = Table("suite", "attacks", "summary")
    for spec in SUITES.values():
        table.add_row(spec.name, ", ".join(a.name for a in spec.attacks), spec.summary + (
            f" [yellow]({spec.caveat})[/]" if spec.caveat else ""))
    stdout.print(table)


@suites.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def suites_show(name: str, as_json: bool) -> None:
    """Show one suite: its attacks in order and the settings it gives each."""
    from robustkit.audit.suites import get_suite

    spec = get_suite(name)
    if as_json:
        emit_json(spec.describe())
        return
    from robustkit.console import stdout

    stdout.print(f"[bold]{spec.name}[/]: {spec.summary}")
    if spec.caveat:
        stdout.print(f"[yellow]{spec.caveat}[/]")
    for position, attack in enumerate(spec.attacks, 1):
        settings = ", ".join(f"{k}={v}" for k, v in attack.settings.items()) or "defaults"
        stdout.print(f"{position}. {attack.name} ({settings})")


@cli.group()
def recipes() -> None:
    """List and inspect the published training recipes of `robustkit harden --recipe`."""


@recipes.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def recipes_list(as_json: bool) -> None:
    """List the recipes with their defence and source."""
    from robustkit.harden.recipes import RECIPES

    if as_json:
        emit_json([r.describe() for r in RECIPES.values()])
        return
    from rich.table import Table

    from robustkit.console import stdout

    table = Table("recipe", "defence", "summary", "source")
    for recipe in RECIPES.values():
        table.add_row(recipe.name, recipe.defence, recipe.summary, recipe.source)
    stdout.print(table)


@recipes.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def recipes_show(name: str, as_json: bool) -> None:
    """Show one recipe: its defence, eps and every setting it gives."""
    from robustkit.harden.recipes import get_recipe

    recipe = get_recipe(name)
    if as_json:
        emit_json(recipe.describe())
        return
    from robustkit.console import stdout

    stdout.print(f"[bold]{recipe.name}[/] ({recipe.defence}, linf eps {recipe.eps:.4g} for inputs in [0, 1]): "
                 f"{recipe.summary}")
    stdout.print(f"source: {recipe.source}")
    for key, value in recipe.params.items():
        stdout.print(f"  {key} = {value}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("robustkit-demo"),
              show_default=True, help="Folder for the demo's model and reports.")
@click.option("--epochs", default=8, show_default=True, help="Training epochs for the demo model.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def demo(out: Path, epochs: int, seed: int, as_json: bool) -> None:
    """Train builtin:digits-cnn on builtin:digits, audit it and report (no download)."""
    from robustkit.cli.demo import print_demo, run_demo

    result = run_demo(out=out, epochs=epochs, seed=seed)
    if as_json:
        emit_json(result)
    else:
        print_demo(result)


def _add_commands() -> None:
    from robustkit.cli.audit import audit
    from robustkit.cli.badge import badge
    from robustkit.cli.compare import compare
    from robustkit.cli.export import export
    from robustkit.cli.harden import harden
    from robustkit.cli.new_plugin import new_plugin

    cli.add_command(audit)
    cli.add_command(compare)
    cli.add_command(badge)
    cli.add_command(harden)
    cli.add_command(export)
    cli.add_command(new_plugin)


_add_commands()


def main() -> None:
    cli(prog_name="robustkit")
