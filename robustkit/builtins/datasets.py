"""The bundled data set, ``builtin:digits``."""
from __future__ import annotations

from typing import Any

from robustkit.data import load_digits
from robustkit.hookspecs import hookimpl
from robustkit.registry import ProviderRegistry


@hookimpl
def robustkit_register_datasets(registry: ProviderRegistry[Any]) -> None:
    registry.add(load_digits, name="digits",
                 summary="scikit-learn's bundled 1,797 real 8x8 digits, 10 classes, fixed 80/20 split")
