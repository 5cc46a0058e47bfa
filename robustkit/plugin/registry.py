"""Name registries for attacks, defences, exporters and data sets.

Names follow one rule everywhere: ``provider:name`` is exact (``art:pgd``); a bare name means
the built-in provider's entry if it has one, else the only provider that has it, else an
error listing the candidates. Aliases resolve like names. Unknown names get close matches.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from robustkit.errors import DuplicateNameError, RobustkitError, UnknownNameError

BUILTIN_PROVIDER = "robustkit"
T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object: an attack/defence/exporter class or a data-set factory."""

    kind: str
    provider: str
    name: str
    obj: T
    plugin: str  #: the plugin that registered it (for error messages and ``plugins``)
    aliases: tuple[str, ...] = ()
    summary: str = ""

    @property
    def qualified_name(self) -> str:
        return f"{self.provider}:{self.name}"


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


@dataclass
class Registry(Generic[T]):
    """All entries of one kind (``attack``, ``defence``, ...), keyed by qualified name."""

    kind: str
    plural: str
    _entries: dict[str, Entry[T]] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)  # "provider:alias" -> qualified

    def add(
        self,
        provider: str,
        name: str,
        obj: T,
        *,
        plugin: str | None = None,
        aliases: tuple[str, ...] = (),
        summary: str = "",
    ) -> Entry[T]:
        plugin = plugin or provider
        for label in (name, *aliases):
            if not _NAME.match(label):
                raise RobustkitError(
                    f"{self.kind} name {label!r} from plugin {plugin!r} is not valid: "
                    "use lower-case letters, digits, '-', '_' or '.'"
                )
        return self.add_entry(Entry(self.kind, provider, name, obj, plugin, tuple(aliases), summary))

    def add_entry(self, entry: Entry[T]) -> Entry[T]:
        """Add a built entry (e.g. one staged in a plugin's own registry); names must be free."""
        for label in (entry.name, *entry.aliases):
            key = f"{entry.provider}:{label}"
            existing = self._entries.get(key) or self._entries.get(self._aliases.get(key, ""))
            if existing is not None:
                raise DuplicateNameError(
                    f"{self.kind} {key!r} is registered twice: by plugin {existing.plugin!r} "
                    f"and by plugin {entry.plugin!r}; rename one or disable a plugin with "
                    "ROBUSTKIT_DISABLE_PLUGINS"
                )
        self._entries[entry.qualified_name] = entry
        for alias in entry.aliases:
            self._aliases[f"{entry.provider}:{alias}"] = entry.qualified_name
        return entry

    def remove_plugin(self, plugin: str) -> None:
        """Drop everything a plugin registered (used when the plugin fails half-way)."""
        doomed = {q for q, e in self._entries.items() if e.plugin == plugin}
        self._entries = {q: e for q, e in self._entries.items() if q not in doomed}
        self._aliases = {a: q for a, q in self._aliases.items() if q not in doomed}

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def list(self, pattern: str = "*") -> list[Entry[T]]:
        """Entries whose qualified or bare name (or alias) matches a shell-style pattern."""
        matched = [
            entry
            for entry in self._entries.values()
            if any(
                fnmatch.fnmatchcase(label, pattern)
                for label in (entry.qualified_name, entry.name, *entry.aliases)
            )
        ]
        return sorted(
            matched,
            key=lambda e: (e.provider != BUILTIN_PROVIDER, _natural_key(e.provider), _natural_key(e.name)),
        )

    def _lookup(self, provider: str, label: str) -> Entry[T] | None:
        key = f"{provider}:{label}"
        return self._entries.get(key) or self._entries.get(self._aliases.get(key, ""))

    def resolve(self, name: str) -> Entry[T]:
        """The entry that ``name`` means, or an error that says what to type instead."""
        text = name.strip().lower()
        if ":" in text:
            provider, _, label = text.partition(":")
            entry = self._lookup(provider, label)
            if entry is not None:
                return entry
            raise self._unknown(name)
        builtin = self._lookup(BUILTIN_PROVIDER, text)
        if builtin is not None:
            return builtin
        providers = sorted({e.provider for e in self._entries.values()})
        found = [e for p in providers if (e := self._lookup(p, text)) is not None]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            options = ", ".join(e.qualified_name for e in found)
            raise UnknownNameError(f"{self.kind} {name!r} is ambiguous; use one of: {options}")
        raise self._unknown(name)

    def _unknown(self, name: str) -> UnknownNameError:
        labels = {e.qualified_name for e in self._entries.values()}
        labels |= {e.name for e in self._entries.values()} | set(self._aliases)
        labels |= {alias.partition(":")[2] for alias in self._aliases}
        close = difflib.get_close_matches(name.lower(), sorted(labels), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if not self._entries:
            return UnknownNameError(f"unknown {self.kind} {name!r}: no {self.plural} are registered")
        return UnknownNameError(
            f"unknown {self.kind} {name!r}{hint} (see `robustkit {self.plural} list`)"
        )


@dataclass(frozen=True)
class ProviderRegistry(Generic[T]):
    """A registry bound to one plugin's provider name: what register hooks receive.

    Binding the provider (as tox's typed register object does) means a plugin can only add
    names under its own prefix, and every error is charged to the right plugin.
    """

    registry: Registry[T]
    provider: str
    plugin: str

    def add(self, obj: T, *, name: str | None = None, aliases: tuple[str, ...] | None = None,
            summary: str | None = None) -> Entry[T]:
        """Register ``obj``; name, aliases and summary default to its class attributes."""
        resolved_name = name or getattr(obj, "name", None)
        if not resolved_name:
            raise RobustkitError(f"plugin {self.plugin!r} registered a {self.registry.kind} without a name")
        doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
        return self.registry.add(
            self.provider,
            resolved_name,
            obj,
            plugin=self.plugin,
            aliases=tuple(aliases if aliases is not None else getattr(obj, "aliases", ())),
            summary=summary if summary is not None else (getattr(obj, "summary", "") or (doc[0] if doc else "")),
        )
