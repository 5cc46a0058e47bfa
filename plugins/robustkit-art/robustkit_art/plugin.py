"""The ``art`` plugin's hooks: register ART's attacks, input transformations and trainers.

Importing this module is cheap (no torch, no ART), so plugin discovery and
``robustkit --help`` stay fast; the classes are imported when the registries are first built,
and ART itself only when an attack runs or a defence is applied.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from robustkit import hookimpl

if TYPE_CHECKING:
    from robustkit import ProviderRegistry

# Looking ART up imports nothing; without it the plugin shows as failed in `robustkit plugins`
# instead of offering attacks that would crash when run.
if importlib.util.find_spec("art") is None:
    raise ImportError(
        "ART is not installed; pip install 'adversarial-robustness-toolbox>=1.17'"
    )


@hookimpl
def robustkit_register_attacks(registry: ProviderRegistry[Any]) -> None:
    from robustkit_art.attacks import ATTACKS

    for attack in ATTACKS:
        registry.add(attack)


@hookimpl
def robustkit_register_defences(registry: ProviderRegistry[Any]) -> None:
    from robustkit_art.defences import DEFENCES
    from robustkit_art.training import TRAINERS

    for defence in (*DEFENCES, *TRAINERS):
        registry.add(defence)
