"""Shared fixtures: a host with built-ins only, and a way to register fake plugins on it.

Tests start with no installed plugin loaded (``Host(entry_points=False)``), so a broken or
missing third-party plugin cannot change what the core tests see; the contract test builds
its own host with entry points on purpose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

# Progress bars on stderr would interleave with CliRunner output; set before robustkit reads it.
os.environ["ROBUSTKIT_NO_PROGRESS"] = "1"

from robustkit.attacks.base import Attack
from robustkit.modules import Model
from robustkit.params import param
from robustkit.plugin import host as host_module
from robustkit.plugin.hookspecs import hookimpl
from robustkit.plugin.host import Host, PluginRecord
from robustkit.threat import Norm, ThreatModel


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """A built-ins-only host installed as the process-wide one, restored afterwards."""
    for name in ("ROBUSTKIT_DISABLE_PLUGINS", "ROBUSTKIT_STRICT_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    # monkeypatch restores the previous host and --plugins-dir list (the CLI's configure()
    # replaces both) when the test ends.
    monkeypatch.setattr(host_module, "_host", None)
    monkeypatch.setattr(host_module, "_plugins_dirs", ())
    fresh = Host(entry_points=False)
    host_module.set_host(fresh)
    yield fresh


@dataclass(frozen=True)
class NudgeParams:
    size: float = param(0.5, "share of eps to move each input by")


class Nudge(Attack):
    """A fake attack: moves every input up by ``size * eps`` (enough to tell attacks apart)."""

    name = "nudge"
    norms = frozenset({Norm.LINF})
    Params = NudgeParams

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        return x + self.params.size * threat.eps * torch.ones_like(x)


def attack_class(name: str, base: type[Attack] = Nudge, **attrs: Any) -> type[Attack]:
    """A subclass of ``base`` registered under ``name`` (for clashes and lookups)."""
    return type(f"Fake_{name.replace('-', '_')}", (base,), {"name": name, **attrs})


def attack_plugin(*classes: type[Attack]) -> object:
    """A plugin object whose register hook adds ``classes``."""

    class Plugin:
        @hookimpl
        def robustkit_register_attacks(self, registry: Any) -> None:
            for cls in classes:
                registry.add(cls)

    return Plugin()


@pytest.fixture
def make_attack() -> Callable[..., type[Attack]]:
    """``make_attack(name, base=Nudge, **class_attrs)``: a fake attack class."""
    return attack_class


@pytest.fixture
def register_plugin(host: Host) -> Callable[..., PluginRecord]:
    """``register_plugin(obj, name, provider=None)`` adds a fake plugin object to the test host."""

    def register(plugin: object, name: str, *, provider: str | None = None) -> PluginRecord:
        return host.register(plugin, name, provider=provider)

    return register


@pytest.fixture
def register_attacks(host: Host) -> Callable[..., PluginRecord]:
    """``register_attacks(plugin_name, *classes, provider=None)``: a fake plugin adding attacks."""

    def register(name: str, *classes: type[Attack], provider: str | None = None) -> PluginRecord:
        return host.register(attack_plugin(*classes), name, provider=provider)

    return register


@pytest.fixture(scope="module")
def builtin_host() -> Iterator[None]:
    """``host`` for a whole module (its module-scoped fixtures run audits): built-in plugins only,
    restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("ROBUSTKIT_DISABLE_PLUGINS", "ROBUSTKIT_STRICT_PLUGINS"):
            patch.delenv(name, raising=False)
        patch.setattr(host_module, "_host", None)
        patch.setattr(host_module, "_plugins_dirs", ())
        host_module.set_host(Host(entry_points=False))
        yield


@pytest.fixture(scope="session")
def cnn_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``builtin:digits-cnn`` trained on the real digits (``robustkit.testing``), as safetensors."""
    from safetensors.torch import save_file

    from robustkit.testing import trained_digits_model

    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(path))
    return path


@pytest.fixture
def run_robustkit() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``python -m robustkit ARGS`` in a subprocess, or with ``processes=N`` under ``torchrun
    --standalone --nproc_per_node=N`` (gloo on the CPU); one torch thread per process, so
    that N processes fit on the cores. ``env`` replaces the inherited environment."""

    def run(
        *args: str | Path, processes: int = 1, env: dict[str, str] | None = None, timeout: int = 600
    ) -> subprocess.CompletedProcess[str]:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        return subprocess.run(
            [sys.executable, *(launcher if processes > 1 else []), "-m", "robustkit", *map(str, args)],
            capture_output=True,
            text=True,
            env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "ROBUSTKIT_NO_PROGRESS": "1"},
            timeout=timeout,
            check=False,
        )

    return run
