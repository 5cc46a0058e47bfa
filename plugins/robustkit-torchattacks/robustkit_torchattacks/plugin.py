"""Entry point of the ``torchattacks`` provider.

Imports only pluggy's marker at module level, so discovering the plugin (``robustkit --help``,
``robustkit plugins``) costs neither torch nor torchattacks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import robustkit

if TYPE_CHECKING:
    from robustkit import ProviderRegistry


@robustkit.hookimpl
def robustkit_register_attacks(registry: ProviderRegistry[Any]) -> None:
    from robustkit_torchattacks.attacks import ATTACKS

    for attack in ATTACKS:
        registry.add(attack)
