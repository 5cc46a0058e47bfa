"""The plugin host: one pluggy ``PluginManager`` and the registries it fills.

Built-in plugins are registered from code; third-party plugins come from the ``robustkit``
entry-point group and from ``--plugins-dir`` files. Each is loaded, validated and asked to
register in its own try block: a plugin that fails to import, has a bad hook signature or
registers a clashing name is recorded as failed (``robustkit plugins`` shows why) and every
other plugin and command keeps working. ``ROBUSTKIT_STRICT_PLUGINS=1`` re-raises instead;
``ROBUSTKIT_DISABLE_PLUGINS=a,b`` skips plugins by name.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from robustkit.errors import RobustkitError
from robustkit.plugin import hookspecs
from robustkit.plugin.registry import BUILTIN_PROVIDER, ProviderRegistry, Registry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "robustkit"
#: Modules registered from code at start-up, all under the provider name "robustkit".
BUILTIN_PLUGINS = ("robustkit.builtins.plugin",)
#: register hook name -> registry attribute of the host
REGISTER_HOOKS = {
    "robustkit_register_attacks": "attacks",
    "robustkit_register_defences": "defences",
    "robustkit_register_exporters": "exporters",
    "robustkit_register_datasets": "datasets",
}
#: hooks whose every result is gathered; a failing implementation is skipped, not fatal
COLLECT_HOOKS = ("robustkit_report_sections",)
#: firstresult hooks: an implementation that refuses or fails lets the next one answer
FIRST_RESULT_HOOKS = ("robustkit_load_model", "robustkit_audit_job", "robustkit_harden_job", "robustkit_export_job")


@dataclass
class PluginRecord:
    """What ``robustkit plugins`` shows for one plugin."""

    name: str
    provider: str
    source: str
    status: str = "ok"  #: "ok", "disabled" or "failed: <reason>"
    hooks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line; later lines are kept (pluggy puts the reason last)."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}".rstrip(": ")


class Host:
    """Loads plugins and answers what they offer."""

    def __init__(
        self,
        *,
        builtins: bool = True,
        entry_points: bool = True,
        plugins_dirs: Sequence[str | Path] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.strict = os.environ.get("ROBUSTKIT_STRICT_PLUGINS", "") not in ("", "0", "false")
        self.disabled = _env_list("ROBUSTKIT_DISABLE_PLUGINS")
        self._registries: dict[str, Registry[Any]] | None = None
        self._staged: list[tuple[PluginRecord, Registry[Any]]] = []  # register hooks' output
        self._collected: tuple[str, list[tuple[str, Any]]] | None = None  # collect()'s results
        self._declined: list[RobustkitError] = []  # first_result()'s refusals and crashes
        if builtins:
            for module_name in BUILTIN_PLUGINS:
                load = functools.partial(importlib.import_module, module_name)
                self._add(module_name, BUILTIN_PROVIDER, "built-in", load)
        if entry_points:
            self._load_entry_points()
        for directory in plugins_dirs:
            self.load_plugins_dir(directory)

    # -- loading -----------------------------------------------------------------------------
    def _fail(self, record: PluginRecord, err: BaseException) -> None:
        record.status = f"failed: {_one_line(err)}"
        log.warning("plugin %r %s", record.name, record.status)
        if self.pm.get_plugin(record.name) is not None:
            self.pm.unregister(name=record.name)
        if self._registries is not None:
            for registry in self._registries.values():
                registry.remove_plugin(record.name)
        if self.strict:
            raise err

    def _add(self, name: str, provider: str, source: str, load: Callable[[], Any]) -> PluginRecord:
        """Import (``load``), validate and register one plugin; failures are recorded."""
        record = PluginRecord(name, provider, source)
        if name in self.records:
            record.status = f"failed: a plugin named {name!r} is already loaded from {self.records[name].source}"
            self.records[f"{name} ({source})"] = record
            if self.strict:
                raise RobustkitError(record.status[len("failed: "):])
            return record
        self.records[name] = record
        if provider == BUILTIN_PROVIDER and source != "built-in":
            # bare names resolve to the built-in provider first: an impostor there would win them
            record.status = (f"failed: the provider name {BUILTIN_PROVIDER!r} is reserved for robustkit's own "
                             "plugins; rename the plugin (its file or entry point)")
            log.warning("plugin %r %s", name, record.status)
            if self.strict:
                raise RobustkitError(record.status[len("failed: "):])
            return record
        if name in self.disabled or provider in self.disabled:
            record.status = "disabled"
            return record
        try:
            plugin = load()
            unknown = [
                attr for attr in dir(plugin)
                if attr.startswith("robustkit_") and not hasattr(self.pm.hook, attr)
                and callable(getattr(plugin, attr))
            ]
            if unknown:
                raise RobustkitError(f"unknown hook {unknown[0]!r}; see docs/plugin-hooks.md for the hook names")
            self.pm.register(plugin, name=name)
            self._guard_impls(plugin, record)
            record.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or ())
        except Exception as err:
            self._fail(record, err)
        else:
            if self._registries is not None:  # registries already built: let it register now
                self._run_register_hooks(only=name)
        return record

    def _load_entry_points(self) -> None:
        seen: set[tuple[str, str]] = set()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (ep.name, ep.value) in seen:  # editable installs can list an entry point twice
                continue
            seen.add((ep.name, ep.value))
            dist = getattr(ep, "dist", None)
            source = f"entry point {ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
            self._add(ep.name, ep.name, source, ep.load)

    def load_plugins_dir(self, directory: str | Path) -> list[PluginRecord]:
        """Load every ``*.py`` file of ``directory`` as a one-off plugin named after the file."""
        path = Path(directory)
        if not path.is_dir():
            raise RobustkitError(f"--plugins-dir {str(directory)!r} is not a directory")
        return [self._add(file.stem, file.stem, f"file {file}", functools.partial(_import_file, file))
                for file in sorted(path.glob("*.py")) if not file.name.startswith("_")]

    def register(self, plugin: Any, name: str, *, provider: str | None = None) -> PluginRecord:
        """Register an in-memory plugin object (tests, notebooks, the Python API)."""
        return self._add(name, provider or name, "registered from code", lambda: plugin)

    # -- dispatch: pluggy calls the hooks, each implementation runs inside a guard ------------
    def _guard_impls(self, plugin: Any, record: PluginRecord) -> None:
        """Wrap each of ``plugin``'s hook implementations so that pluggy's own dispatch
        (``pm.hook.*``: wrappers, firstresult, tryfirst/trylast) calls them, and a failure is
        still charged to this plugin alone. Wrapper implementations (generators) run unguarded:
        they see and shape the whole call, as pluggy documents."""
        for caller in self.pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    # HookImpl.function is typed Final, but it is what _multicall calls: the guard
                    # goes there so that pluggy still dispatches (argnames stay the original's).
                    impl.function = self._guarded(caller.name, impl.function, record)  # type: ignore[misc]

    def _guarded(self, hook_name: str, function: Callable[..., Any], record: PluginRecord) -> Callable[..., Any]:
        register = hook_name in REGISTER_HOOKS

        @functools.wraps(function)
        def call(*args: Any) -> Any:
            try:
                if register:  # stage into a registry of the plugin's own, bound to its provider
                    (registry,) = args
                    staged: Registry[Any] = Registry(registry.kind, registry.plural)
                    function(ProviderRegistry(staged, record.provider, record.name))
                    self._staged.append((record, staged))
                    return None
                result = function(*args)
            except RobustkitError as err:
                if hook_name in FIRST_RESULT_HOOKS:  # a refusal: the answer unless another loader has one
                    self._declined.append(err)
                    return None
                return self._charge(record, hook_name, err)
            except Exception as err:
                return self._charge(record, hook_name, err)
            if self._collected is not None and hook_name == self._collected[0]:
                self._collected[1].append((record.name, result))
            return result

        return call

    def _charge(self, record: PluginRecord, hook_name: str, err: BaseException) -> None:
        """A hook implementation failed: the plugin is marked failed (register hooks,
        commands), or the failure is logged naming it and the next implementation answers
        (model loaders, report sections)."""
        if hook_name in FIRST_RESULT_HOOKS:
            if self.strict:
                raise err
            failure = f"plugin {record.name!r} failed in {hook_name}: {_one_line(err)}"
            log.warning("%s; trying the next loader", failure)
            self._declined.append(RobustkitError(failure))
            return None
        if hook_name in COLLECT_HOOKS:
            if self.strict:
                raise err
            log.warning("plugin %r failed in %s: %s", record.name, hook_name, _one_line(err))
            return None
        self._fail(record, err)
        return None

    def _run_register_hooks(self, only: str | None = None) -> None:
        """Call every register hook through pluggy (``only``: one newly added plugin's), then
        add what each plugin staged in load order: built-ins first, so a clashing name is
        charged to the plugin that came later, never to the built-ins."""
        assert self._registries is not None
        for hook_name, attr in REGISTER_HOOKS.items():
            self._staged = []
            self._caller(hook_name, only)(registry=self._registries[attr])
            order = list(self.records)
            for record, staged in sorted(self._staged, key=lambda pair: order.index(pair[0].name)):
                if not record.ok:
                    continue
                try:
                    for entry in staged:
                        self._registries[attr].add_entry(entry)
                except Exception as err:
                    self._fail(record, err)
            self._staged = []

    def _caller(self, hook_name: str, only: str | None) -> Any:
        """The hook caller of every plugin, or of the plugin named ``only``."""
        if only is None:
            return getattr(self.pm.hook, hook_name)
        others = [plugin for name, plugin in self.pm.list_name_plugin() if name != only]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    @property
    def registries(self) -> dict[str, Registry[Any]]:
        if self._registries is None:
            self._registries = {
                "attacks": Registry("attack", "attacks"),
                "defences": Registry("defence", "defences"),
                "exporters": Registry("exporter", "exporters"),
                "datasets": Registry("dataset", "datasets"),
            }
            self._run_register_hooks()
        return self._registries

    @property
    def attacks(self) -> Registry[Any]:
        return self.registries["attacks"]

    @property
    def defences(self) -> Registry[Any]:
        return self.registries["defences"]

    @property
    def exporters(self) -> Registry[Any]:
        return self.registries["exporters"]

    @property
    def datasets(self) -> Registry[Any]:
        return self.registries["datasets"]

    def first_result(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a firstresult hook. An implementation that refuses (a ``RobustkitError``) or
        crashes (charged to its plugin, with a warning) lets the next one answer; when none
        answers, the first refusal or crash is the error."""
        self._declined = []
        result = getattr(self.pm.hook, hook_name)(**kwargs)
        if result is None and self._declined:
            raise self._declined[0]
        return result

    def collect(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Every implementation's result with its plugin's name; failures are logged and
        charged to the plugin."""
        self._collected = (hook_name, [])
        try:
            getattr(self.pm.hook, hook_name)(**kwargs)
            return self._collected[1]
        finally:
            self._collected = None

    def register_commands(self, cli: Any) -> None:
        self.pm.hook.robustkit_register_commands(cli=cli)

    def plugins(self) -> list[PluginRecord]:
        self.registries  # noqa: B018 - running the register hooks can mark plugins failed
        return list(self.records.values())


def _import_file(path: Path) -> Any:
    module_name = f"robustkit_plugins_dir.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RobustkitError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


_host: Host | None = None
_plugins_dirs: tuple[str, ...] = ()


def configure(plugins_dirs: Iterable[str | Path] = ()) -> Host:
    """(Re)create the process-wide host, e.g. with the CLI's ``--plugins-dir`` folders."""
    global _host, _plugins_dirs
    _plugins_dirs = tuple(str(p) for p in plugins_dirs)
    _host = Host(plugins_dirs=_plugins_dirs)
    return _host


def get_host() -> Host:
    """The process-wide host, created on first use."""
    global _host
    if _host is None:
        _host = Host(plugins_dirs=_plugins_dirs)
    return _host


def set_host(host: Host | None) -> None:
    """Replace the process-wide host (tests register fakes on a host of their own)."""
    global _host
    _host = host
