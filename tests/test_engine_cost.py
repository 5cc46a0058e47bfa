"""The engine's cost grows with the answer: the nested-search shortcut for gradient-free attacks
(what it runs, what it skips, that it says so, how little it changes) and clean logits passed in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor

from robustkit.attacks.base import Attack
from robustkit.attacks.native import FGSM
from robustkit.attacks.square import Square
from robustkit.audit.engine import NEVER, Evaluation, NamedAttack, evaluate
from robustkit.audit.suites import SUITES
from robustkit.data import load_digits
from robustkit.errors import RobustkitError
from robustkit.modules import predict_logits
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

EPS = (0.03, 0.06, 0.1)  # the digits CNN is robust for about half the samples at 0.1, most at 0.03
N, QUERIES = 120, 100


def threats(eps: tuple[float, ...] = EPS) -> list[ThreatModel]:
    return [ThreatModel(Norm.LINF, e) for e in eps]


def digits(n: int = N) -> tuple[torch.nn.Module, Tensor, Tensor]:
    data = load_digits()
    return trained_digits_model("cnn"), data.x[:n], data.y[:n]


def rows(evaluation: Evaluation) -> int:
    return sum(sum(o.attacked.values()) for o in evaluation.outcomes)


def test_square_shortcut_attacks_fewer_rows_and_says_what_it_skipped():
    model, x, y = digits()
    square = [NamedAttack("robustkit:square", Square(queries=QUERIES))]
    full = evaluate(model, x, y, square, threats())
    short = evaluate(model, x, y, square, threats(), gradient_free_shortcut=True)
    (off,), (on,) = full.outcomes, short.outcomes
    standing = int(full.clean_correct.sum())  # one attack, per-attack mode: every eps, every correct sample
    assert off.skipped == {} and off.notes == [] and not full.gradient_free_shortcut
    assert short.gradient_free_shortcut
    assert off.attacked == dict.fromkeys(EPS, standing)

    assert rows(short) < rows(full)
    largest = EPS[-1]
    assert on.attacked[largest] == standing and largest not in on.skipped  # all first at the largest eps
    unbroken = int((on.broken_at > largest).sum())  # what Square could not break at the largest eps
    assert 0 < unbroken < standing
    for e in EPS[:-1]:
        # every standing sample is attacked or skipped; skipped: exactly those not broken at the largest eps
        assert on.skipped[e] == unbroken
        assert on.attacked[e] + on.skipped[e] == standing
    assert len(on.notes) == len(EPS) - 1
    for note, e in zip(on.notes, EPS[:-1]):
        assert note.startswith(f"robustkit:square at {e:.3g} ran on the {on.attacked[e]} standing samples it broke")
        assert f"{unbroken} standing samples it could not break at {largest:.3g} were not attacked at {e:.3g}" in note
        assert "nested-search shortcut" in note and "autoattack never uses it" in note
    # the answer barely moves. Square's draws depend on its batch, so even at the largest eps
    # (never skipped) the two runs differ by a few samples, as much as Square with another seed.
    for e in EPS:
        assert abs(short.worst_case(e) - full.worst_case(e)) <= 8 / N, e
    assert sum(on.seconds.values()) > 0 and sorted(on.seconds) == list(EPS)


class Wobble(Attack):
    """Gradient-free and deterministic: moves every pixel by its sample's radius, up or down by a
    pattern that changes with the radius. What it breaks depends only on the sample and the eps,
    never on the batch, and is not monotone in eps (as random search need not be), so what the
    shortcut misses can be predicted exactly."""

    name = "wobble"
    norms = frozenset({Norm.LINF})
    needs_gradients = False

    def __init__(self, per_sample_eps: bool) -> None:
        super().__init__()
        self.per_sample_eps = per_sample_eps
        self.calls: list[list[float]] = []  #: the distinct radii of each call

    def run(self, model, x, labels, threat, radii=None):
        radii = torch.full((len(x),), threat.eps, dtype=torch.float64) if radii is None else radii
        self.calls.append(sorted(set(radii.tolist())))
        return wobble(x, radii.to(x.dtype).view(-1, 1, 1, 1))


def wobble(x: Tensor, radius: Tensor | float) -> Tensor:
    radius = torch.as_tensor(radius, dtype=x.dtype)
    phase = torch.arange(x[0].numel(), dtype=x.dtype).view(x.shape[1:]) * 0.7
    return x + radius * torch.sign(torch.sin(phase * radius * 40 + x * 5))


@pytest.mark.parametrize("per_sample_eps", [True, False])
def test_the_shortcut_misses_only_breaks_below_a_ball_the_attack_could_not_break(per_sample_eps):
    """With a deterministic attack the shortcut's answer is known: a sample is attacked at the
    largest eps, then below it only while the attack breaks it (an attack taking per-sample
    radii: every smaller eps at once); the breaks it misses lie below an eps where it failed, and
    each such skip is counted."""
    model, x, y = digits(200)
    eps = [0.2, 0.3, 0.4, 0.5]
    attack = Wobble(per_sample_eps)
    evaluation = evaluate(model, x, y, [NamedAttack("wobble", attack)], threats(tuple(eps)),
                          gradient_free_shortcut=True)
    (outcome,) = evaluation.outcomes
    correct = evaluation.clean_correct
    with torch.no_grad():
        breaks = torch.stack([model(wobble(x, e).clamp(0, 1)).argmax(1) != y for e in eps]) & correct
    full = torch.where(correct, torch.tensor(NEVER), torch.tensor(0.0))  # without the shortcut
    for k in reversed(range(len(eps))):
        full[breaks[k]] = eps[k]
    expected, skipped = torch.where(correct, torch.tensor(NEVER), torch.tensor(0.0)), dict.fromkeys(eps, 0)
    for i in correct.nonzero().squeeze(1).tolist():
        for k in reversed(range(len(eps))):
            if not breaks[k, i]:
                for e in eps[:k]:
                    skipped[e] += 1
                break
            if per_sample_eps:  # broken at the largest eps: every smaller one in one batch
                expected[i] = full[i]
                break
            expected[i] = eps[k]
    assert torch.equal(outcome.broken_at, expected)
    assert outcome.skipped == {e: c for e, c in skipped.items() if c}
    assert len(outcome.notes) == len(outcome.skipped)
    missed = int((expected != full).sum())
    assert missed > 0  # the pattern is not monotone in eps, and the shortcut shows it
    assert [outcome.attacked[e] + outcome.skipped.get(e, 0) for e in eps] == [int(correct.sum())] * len(eps)
    if per_sample_eps:  # two batches: the largest eps, then every smaller eps of what broke there
        assert attack.calls == [[eps[-1]], eps[:-1]]
    else:  # one call per eps, largest first
        assert attack.calls == [[e] for e in reversed(eps)]


def test_the_shortcut_counts_against_what_earlier_attacks_and_proofs_left_standing():
    """Cascade with certificates: at each eps Square attacks or skips exactly the samples that
    FGSM left standing and no proof covers; a sample FGSM broke at the largest eps but not at a
    smaller one is attacked first at that smaller eps, not skipped."""
    model, x, y = digits()
    suite = [NamedAttack("robustkit:fgsm", FGSM()), NamedAttack("robustkit:square", Square(queries=QUERIES))]
    evaluation = evaluate(model, x, y, suite, threats(), cascade=True, certify=True, gradient_free_shortcut=True)
    fgsm, square = evaluation.outcomes
    assert evaluation.proven is not None
    for e in EPS:
        eligible = int(((fgsm.broken_at > e) & (evaluation.proven < e)).sum())
        assert square.attacked[e] + square.skipped.get(e, 0) == eligible, e
    assert square.skipped and fgsm.skipped == {} and fgsm.notes == []


def test_clean_logits_passed_in_give_the_same_evaluation():
    model, x, y = digits(80)
    suite = [NamedAttack("robustkit:fgsm", FGSM()), NamedAttack("robustkit:square", Square(queries=30))]
    own = evaluate(model, x, y, suite, threats(), cascade=True, gradient_free_shortcut=True)
    given = evaluate(model, x, y, suite, threats(), cascade=True, gradient_free_shortcut=True,
                     clean_logits=predict_logits(model, x))
    assert torch.equal(own.clean_correct, given.clean_correct)
    for a, b in zip(own.outcomes, given.outcomes):
        assert torch.equal(a.broken_at, b.broken_at)
        assert (a.attacked, a.skipped, a.notes) == (b.attacked, b.skipped, b.notes)
    # the logits decide what is attacked: a sample they call wrong is a clean mistake, never attacked
    wrong = predict_logits(model, x)
    wrong[0] = 0
    wrong[0, (int(y[0]) + 1) % 10] = 1
    told = evaluate(model, x, y, suite[:1], threats(), clean_logits=wrong)
    assert not bool(told.clean_correct[0]) and float(told.worst_broken_at()[0]) == 0
    with pytest.raises(RobustkitError, match="clean_logits must have shape"):
        evaluate(model, x, y, suite, threats(), clean_logits=wrong[:-1])


def test_suites_say_whether_they_use_the_shortcut():
    assert SUITES["default"].gradient_free_shortcut and SUITES["quick"].gradient_free_shortcut
    assert not SUITES["autoattack"].gradient_free_shortcut
    assert all(s.describe()["gradient_free_shortcut"] == s.gradient_free_shortcut for s in SUITES.values())


RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from robustkit.attacks.square import Square
    from robustkit.audit.engine import NamedAttack, evaluate
    from robustkit.data import load_digits
    from robustkit.distributed import distributed_session
    from robustkit.models.zoo import digits_cnn
    from robustkit.threat import Norm, ThreatModel

    weights, out, n, queries = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    eps = [float(e) for e in sys.argv[5].split(",")]
    model = digits_cnn()
    model.load_state_dict(torch.load(weights))
    model.eval()
    data = load_digits()
    with distributed_session("cpu") as world:
        evaluation = evaluate(model, data.x[:n], data.y[:n], [NamedAttack("robustkit:square", Square(queries=queries))],
                              [ThreatModel(Norm.LINF, e) for e in eps], batch_size=4, dist_ctx=world,
                              gradient_free_shortcut=True)
        (outcome,) = evaluation.outcomes
        if world.is_main:
            with open(out, "w") as f:
                json.dump({"broken_at": outcome.broken_at.tolist(), "attacked": list(outcome.attacked.items()),
                           "skipped": list(outcome.skipped.items()), "notes": outcome.notes}, f)
    """
)


@pytest.mark.slow
def test_torchrun_shortcut_equals_a_single_process(tmp_path: Path):
    """Every rank forms the same stages from merged results; batches of 4 (x4 for a gradient-free
    attack) over 48 samples, dealt to 2 ranks, give the single process's answer."""
    n, queries, eps = 48, 30, "0.05,0.1,0.15"
    model = trained_digits_model("cnn")
    weights = tmp_path / "cnn.pt"
    torch.save(model.state_dict(), weights)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"{processes}.json"
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                  if processes > 1 else [sys.executable])
        done = subprocess.run([*launch, str(script), str(weights), str(out), str(n), str(queries), eps],
                              capture_output=True, text=True, timeout=300, check=False, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[processes] = json.loads(out.read_text())
    assert runs[1] == runs[2]
    assert runs[1]["skipped"]  # the shortcut did skip something, so the stages were exercised
