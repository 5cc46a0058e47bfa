"""Published adversarial-training configurations, by name (``robustkit harden --recipe NAME``).

A recipe is a defence with the settings its paper used for CIFAR-10 (linf 8/255 on inputs in
[0, 1], ResNet-class networks); eps scales with the data's bounds. Flags and ``-o`` override
any of it, and the run's config.json records the recipe and every resolved setting.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from robustkit.errors import UnknownNameError


@dataclass(frozen=True)
class Recipe:
    name: str
    defence: str
    summary: str
    source: str  #: the paper (and code) the settings come from
    eps: float  #: linf radius for inputs in [0, 1]; scaled by the data's bounds
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "defence": self.defence, "summary": self.summary, "source": self.source,
                "threat": "linf", "eps": self.eps, "params": dict(self.params)}


_SGD = {"optimizer": "sgd", "nesterov": False, "augment": "auto"}

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "fast-at", "fgsm-rs",
            "fast adversarial training: FGSM from a random start, step 1.25 eps, one-cycle lr 0.2, 15 epochs",
            "Wong, Rice & Kolter, 'Fast is better than free', ICLR 2020 (github.com/locuslab/fast_adversarial)",
            8 / 255,
            {**_SGD, "epochs": 15, "batch_size": 128, "lr": 0.2, "weight_decay": 5e-4, "schedule": "cyclic",
             "step_factor": 1.25, "random_start": True},
        ),
        Recipe(
            "pgd-at", "pgd-at",
            "PGD-10 adversarial training (step 2/255), SGD 0.1, weight decay 5e-4, lr / 10 at 50% and 75%, "
            "200 epochs with early stopping on robust validation accuracy",
            "Madry et al., ICLR 2018; Rice, Wong & Kolter, 'Overfitting in adversarially robust deep "
            "learning', ICML 2020 (github.com/locuslab/robust_overfitting)",
            8 / 255,
            {**_SGD, "epochs": 200, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "schedule": "piecewise",
             "milestones": "0.5,0.75", "steps": 10, "step_size": 2 / 255, "patience": 10},
        ),
        Recipe(
            "trades", "trades",
            "TRADES beta 6: 10 steps of 0.007, SGD 0.1, weight decay 2e-4, lr / 10 at 75% and 90%, 100 epochs",
            "Zhang et al., 'Theoretically principled trade-off between robustness and accuracy', ICML 2019 "
            "(github.com/yaodongyu/TRADES)",
            0.031,
            {**_SGD, "epochs": 100, "batch_size": 128, "lr": 0.1, "weight_decay": 2e-4, "schedule": "piecewise",
             "milestones": "0.75,0.9", "beta": 6.0, "steps": 10, "step_size": 0.007},
        ),
    )
}

#: Recipe settings in input units of [0, 1] data, scaled with the data's range like eps.
SCALED = ("step_size",)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownNameError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} "
                               "(see `robustkit recipes list`)") from None
