"""Named attack suites: which attacks an audit runs, in which order, with which settings.

The engine runs them cheapest first and, in cascade mode, each only on what the earlier ones
left standing, so a strong suite costs little more than its first attack on a weak model.

- ``default``: native attacks, AutoAttack's components or stronger. Cross-entropy alone is not
  a suite: a model whose softmax saturates gives vanishing CE gradients, and only a margin
  loss that ignores the logits' scale (DLR, in APGD-T) breaks it. The minimum-norm attack
  answers every eps of an audit in one run; Square checks that gradients did not mislead.
- ``autoattack``: AutoAttack standard's own budget (Croce & Hein, 2020), natively, for numbers
  comparable with RobustBench. robustkit has no FAB-T: FMN (Pintor et al., 2021), the other
  minimum-norm attack, takes its place, and the suite says so.
- ``quick``: FGSM and a short APGD, for a first look. Every output labels it: it is not a
  robustness claim.

``gradient_free_shortcut``: whether the engine runs gradient-free attacks (Square) as a nested
search, largest eps first, not attacking at a smaller eps the samples they could not break in
a larger ball (``robustkit.audit.engine``). It spends one query budget per robust sample instead
of one per eps, and may miss a break random search would have found in the smaller ball, so
the report says what was skipped. On in ``default`` and ``quick``; never in ``autoattack``,
whose numbers must be comparable with AutoAttack's (Square at every eps on every survivor).

``-o`` may change a suite attack's parameters: the report then names the suite modified and
lists each change (``SuiteChange``); one that lowers a budget (``BUDGETS``) makes the audit
weaker than the suite's name promises, which the caveat says (``Suite.caveat_for``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from robustkit.errors import RobustkitError


@dataclass(frozen=True)
class SuiteAttack:
    name: str  #: registry name, e.g. ``robustkit:apgd``
    settings: Mapping[str, Any] = field(default_factory=dict)  #: Params overrides


#: Parameters that size an attack's search: a smaller value is a weaker attack.
BUDGETS = frozenset({"steps", "queries", "restarts", "n_target_classes", "classes"})


@dataclass(frozen=True)
class SuiteChange:
    """A suite attack's parameter that ``-o`` set away from the suite's value."""

    attack: str  #: qualified name, e.g. ``robustkit:apgd``
    parameter: str
    suite: Any  #: the value the suite runs the attack with
    used: Any  #: the value this audit ran it with

    @property
    def name(self) -> str:
        """``apgd.steps``: as ``-o`` names it."""
        return f"{self.attack.rpartition(':')[2]}.{self.parameter}"

    @property
    def weakens(self) -> bool:
        """Whether the change lowers a budget, so the attack searches less than the suite's."""
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.suite, self.used))
        return self.parameter in BUDGETS and numbers and self.used < self.suite

    def text(self) -> str:
        return f"{self.name} {self.suite} -> {self.used}"

    def to_json_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "parameter": self.parameter, "suite": self.suite, "used": self.used}


@dataclass(frozen=True)
class Suite:
    name: str
    summary: str
    attacks: tuple[SuiteAttack, ...]
    #: printed beside every result of the suite; non-empty for suites that are no robustness claim
    caveat: str = ""
    #: run gradient-free attacks as a nested search, largest eps first (module docstring)
    gradient_free_shortcut: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "caveat": self.caveat,
                "attacks": [{"name": a.name, "settings": dict(a.settings)} for a in self.attacks],
                "gradient_free_shortcut": self.gradient_free_shortcut}

    def caveat_for(self, changes: Sequence[SuiteChange]) -> str:
        """The caveat of the suite run with ``changes``: its own, and, where they lower a budget,
        that the audit is weaker than the suite (its figures overstate the robustness)."""
        weaker = [c.name for c in changes if c.weakens]
        if not weaker:
            return self.caveat
        smaller = (f"suite {self.name} with smaller budgets ({', '.join(weaker)}): weaker attacks than the "
                   "suite's, not a robustness claim (run without those -o options)")
        return "; ".join(filter(None, (self.caveat, smaller)))


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite(
            "default",
            "FGSM, APGD-CE, APGD-T (DLR, 3 targets), FMN (untargeted), Square (1,000 queries): AutoAttack's "
            "components or stronger, cheapest first",
            (
                SuiteAttack("robustkit:fgsm"),
                SuiteAttack("robustkit:apgd", {"loss": "ce", "steps": 50}),
                SuiteAttack("robustkit:apgd-t", {"steps": 50, "n_target_classes": 3}),
                # the paper's untargeted FMN: targets are APGD-T's job; the targeted searches
                # (classes 3) tripled its cost and broke no sample APGD-T left on the benchmark's
                # CIFAR-shape models (docs/performance.md)
                SuiteAttack("robustkit:fmn", {"steps": 100, "classes": 1}),
                SuiteAttack("robustkit:square", {"queries": 1000}),
            ),
            gradient_free_shortcut=True,
        ),
        Suite(
            "autoattack",
            "AutoAttack standard's budget: APGD-CE 100 steps, APGD-T 9 targets x 100 steps, FMN in place "
            "of FAB-T with its budget (3 classes x 300 steps for FAB-T's 9 x 100), Square 5,000 queries",
            (
                SuiteAttack("robustkit:apgd", {"loss": "ce", "steps": 100}),
                SuiteAttack("robustkit:apgd-t", {"steps": 100, "n_target_classes": 9}),
                SuiteAttack("robustkit:fmn", {"steps": 300, "classes": 3}),
                SuiteAttack("robustkit:square", {"queries": 5000}),
            ),
            gradient_free_shortcut=False,  # AutoAttack's Square: every eps, every survivor
        ),
        Suite(
            "quick",
            "FGSM and APGD-CE with 20 steps: a first look",
            (SuiteAttack("robustkit:fgsm"), SuiteAttack("robustkit:apgd", {"loss": "ce", "steps": 20})),
            caveat="quick suite: a first look, not a robustness claim (use --suite default)",
            gradient_free_shortcut=True,
        ),
    )
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        known = ", ".join(SUITES)
        raise RobustkitError(f"unknown suite {name!r}; known: {known} (see `robustkit suites list`)") from None
