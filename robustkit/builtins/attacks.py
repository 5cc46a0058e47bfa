"""robustkit's native attacks, registered like any plugin's."""
from __future__ import annotations

from typing import Any

from robustkit.attacks.native import FGSM, PGD
from robustkit.hookspecs import hookimpl
from robustkit.registry import ProviderRegistry


@hookimpl
def robustkit_register_attacks(registry: ProviderRegistry[Any]) -> None:
    registry.add(FGSM)
    registry.add(PGD)
