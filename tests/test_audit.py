"""The audit: numbers that agree with direct attacks, checks that catch gradient masking,
the report files, interruption, distributed sharding and one-line errors."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from robustkit.attacks.base import Attack
from robustkit.attacks.native import FGSM, PGD
from robustkit.audit.engine import GRADIENT_FREE_BATCH_FACTOR, NamedAttack, evaluate
from robustkit.audit.report import REQUIRED_KEYS, SCHEMA_VERSION
from robustkit.audit.run import AuditConfig, run_audit
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.models.base import LoadOptions
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

EPS = (0.05, 0.1)
FAST = (("apgd.steps", "10"), ("apgd-t.steps", "10"), ("fmn.steps", "20"), ("square.queries", "300"))


class Quantize(nn.Module):
    """A quantising input layer: rounding has zero gradient almost everywhere (masking)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


#: Built-in plugins only, whatever is installed (tests/conftest.py's ``host`` fixture).
pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(path))
    return path


def masked_model_factory() -> nn.Module:
    return nn.Sequential(Quantize(), trained_digits_model("cnn"))


def invoke_audit(weights: Path, *args: str):
    """``robustkit audit WEIGHTS --arch builtin:digits-cnn ARGS...`` through click's runner."""
    return CliRunner().invoke(cli, ["audit", str(weights), "--arch", "builtin:digits-cnn", *args])


def audit(model: str, **kwargs) -> dict:
    options = kwargs.pop("options", FAST if "attacks" not in kwargs else (("pgd.steps", "10"),))
    config = AuditConfig(
        model,
        load=LoadOptions(arch=kwargs.pop("arch", "builtin:digits-cnn")),
        eps=EPS,
        limit=kwargs.pop("limit", 120),
        options=options,
        **kwargs,
    )
    return run_audit(config)


def test_report_numbers_agree_with_direct_attacks(weights):
    report = audit(str(weights), attacks=("fgsm", "pgd"), mode="per-attack", run_checks=False)
    data = load_digits()
    x, y = data.x[:120], data.y[:120]
    model = trained_digits_model("cnn")
    direct = {"robustkit:fgsm": FGSM(), "robustkit:pgd": PGD(steps=10)}
    for row in report["results"]:
        result = direct[row["attack"]](model, x, y, threat=ThreatModel("linf", row["eps"]))
        assert abs(row["robust_accuracy"] - result.robust_accuracy) <= 0.025, row
    for worst in report["worst_case"]:
        singles = [r["robust_accuracy"] for r in report["results"] if r["eps"] == worst["eps"]]
        assert worst["robust_accuracy"] <= min(singles) + 1e-9
    clean = float((model(x).argmax(1) == y).float().mean())
    assert report["clean_accuracy"] == pytest.approx(clean)


def test_cascade_worst_case_matches_per_attack_and_costs_less(weights):
    cascade = audit(str(weights), attacks=("fgsm", "pgd"), mode="cascade", run_checks=False)
    full = audit(str(weights), attacks=("fgsm", "pgd"), mode="per-attack", run_checks=False)
    for a, b in zip(cascade["worst_case"], full["worst_case"]):
        assert abs(a["robust_accuracy"] - b["robust_accuracy"]) <= 0.02
    attacked = lambda r: sum(row["attacked"] for row in r["results"])  # noqa: E731
    assert attacked(cascade) < attacked(full)


class BatchLog(Attack):
    """Records the batch sizes the engine hands it; changes nothing."""

    name = "batch-log"
    norms = frozenset({Norm.LINF})

    def __init__(self, needs_gradients: bool) -> None:
        super().__init__()
        self.needs_gradients = needs_gradients
        self.sizes: list[int] = []

    def run(self, model, x, labels, threat):
        self.sizes.append(len(x))
        return x


def test_gradient_free_attacks_get_larger_batches():
    model, data = trained_digits_model("cnn"), load_digits()
    x, y = data.x[:100], data.y[:100]
    white, black = BatchLog(needs_gradients=True), BatchLog(needs_gradients=False)
    evaluation = evaluate(model, x, y, [NamedAttack("white", white), NamedAttack("black", black)],
                          [ThreatModel.parse("linf:0.1")], batch_size=16)
    standing = int(evaluation.clean_correct.sum())  # clean mistakes are not attacked

    def batches(size: int) -> list[int]:
        return [min(size, standing - start) for start in range(0, standing, size)]

    assert white.sizes == batches(16)
    assert black.sizes == batches(16 * GRADIENT_FREE_BATCH_FACTOR)


class Fade(Attack):
    """Gradient-free and deterministic: moves every pixel by its sample's radius, towards grey
    or darker. What it breaks depends only on the sample and the eps, never on the batch."""

    name = "fade"
    norms = frozenset({Norm.LINF})
    needs_gradients = False

    def __init__(self, towards_grey: bool, per_sample_eps: bool) -> None:
        super().__init__()
        self.towards_grey, self.per_sample_eps = towards_grey, per_sample_eps
        self.calls: list[list[float]] = []  #: the distinct radii of each call

    def run(self, model, x, labels, threat, radii=None):
        radii = torch.full((len(x),), threat.eps, dtype=torch.float64) if radii is None else radii
        self.calls.append(sorted(set(radii.tolist())))
        return fade(x, radii.to(x.dtype).view(-1, 1, 1, 1), self.towards_grey)


def fade(x: torch.Tensor, radius: float | torch.Tensor, towards_grey: bool) -> torch.Tensor:
    return x + radius * (torch.sign(0.5 - x) if towards_grey else -torch.ones_like(x))


@pytest.mark.parametrize("cascade", [False, True])
def test_an_attack_taking_per_sample_radii_runs_once_for_every_eps(cascade):
    model, data = trained_digits_model("cnn"), load_digits()
    x, y = data.x[:150], data.y[:150]
    eps = [0.1, 0.2, 0.3, 0.4]
    runs = {}
    for merged in (True, False):
        suite = [NamedAttack("grey", Fade(towards_grey=True, per_sample_eps=merged)),
                 NamedAttack("dark", Fade(towards_grey=False, per_sample_eps=False))]
        runs[merged] = evaluate(model, x, y, suite, [ThreatModel(Norm.LINF, e) for e in eps], cascade=cascade)
        assert suite[0].attack.calls == ([eps] if merged else [[e] for e in eps])  # one batch holds every eps
    merged = runs[True]
    grey, dark = (o.broken_at for o in merged.outcomes)
    direct = torch.full((len(x),), float("inf"))  # the smallest eps at which fading to grey breaks each sample
    for e in reversed(eps):
        with torch.no_grad():
            direct[model(fade(x, e, towards_grey=True).clamp(0, 1)).argmax(1) != y] = e
    direct[~merged.clean_correct] = 0
    assert len({float(v) for v in direct[direct.isfinite()]}) == 1 + len(eps)  # it breaks samples at every eps
    if cascade:  # run after "dark" (though listed first), on what "dark" left standing at each eps
        assert [merged.outcomes[0].attacked[e] for e in eps] == [int((dark > e).sum()) for e in eps]
        assert torch.equal(merged.worst_broken_at(), torch.minimum(direct, dark))
    else:
        assert [merged.outcomes[0].attacked[e] for e in eps] == [int(merged.clean_correct.sum())] * len(eps)
        assert torch.equal(grey, direct)
    assert torch.equal(merged.worst_broken_at(), runs[False].worst_broken_at())  # as if run eps by eps
    assert sorted(merged.outcomes[0].seconds) == eps


def test_checks_flag_a_gradient_masked_model(tmp_path):
    path = tmp_path / "masked.pt"
    torch.save(masked_model_factory().state_dict(), path)
    factory = f"{Path(__file__).resolve()}:masked_model_factory"
    report = audit(str(path), arch=factory, check_samples=64)
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["gradients"] == "fail"
    assert status["large-eps probe"] == "fail"
    assert status["gradient-free <= white-box"] in ("warn", "fail")
    assert any(c["status"] == "fail" for c in report["checks"])


def test_checks_stay_quiet_on_a_plain_model(weights):
    report = audit(str(weights), check_samples=64)
    status = {c["name"]: c["status"] for c in report["checks"]}
    for name in (
        "deterministic",
        "stateless",
        "logits",
        "scores vary",
        "gradients",
        "valid examples",
        "iterative >= fgsm",
        "monotone in eps",
        "large-eps probe",
        "gradient-free <= white-box",
    ):
        assert status[name] == "pass", (name, report["checks"])


def test_report_files_schema_and_html(weights, tmp_path):
    out = tmp_path / "report"
    result = invoke_audit(weights, "--eps", "0.05,0.1", "--limit", "60", "-o", "apgd.steps", "5",
                          "-o", "square.queries", "100", "--check-samples", "32", "--out", str(out), "--json")
    assert result.exit_code in (0, 3), result.output
    document = json.loads(result.stdout)
    on_disk = json.loads((out / "report.json").read_text())
    assert document["results"] == on_disk["results"]
    for key in REQUIRED_KEYS:
        assert key in document, key
    assert document["schema_version"] == SCHEMA_VERSION and document["complete"] is True
    for row in document["results"]:
        assert {"attack", "norm", "eps", "robust_accuracy", "ci95", "seconds", "params"} <= set(row)
        assert row["ci95"][0] <= row["robust_accuracy"] <= row["ci95"][1]
    for row in document["worst_case"]:
        assert {"norm", "eps", "robust_accuracy", "ci95", "certified_accuracy", "certified_ci95"} <= set(row)
        assert 0 <= row["certified_accuracy"] <= row["robust_accuracy"]
    assert document["worst_case"][0]["certified_accuracy"] > 0.3  # the plain digits CNN is provable at 0.05
    assert "CROWN" in document["certification"]["method"]
    assert all(c["status"] in ("pass", "warn", "fail", "untested") for c in document["checks"])
    assert {c["name"]: c["status"] for c in document["checks"]}["certificates hold"] == "pass"
    assert len(document["model"]["sha256"]) == 64 and document["model"]["format"] == "safetensors"

    class Collector(HTMLParser):
        tags: list[tuple[str, dict]] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    parser = Collector()
    parser.feed((out / "report.html").read_text())
    images = [a for t, a in parser.tags if t == "img"]
    assert images and images[0]["src"].startswith("data:image/png;base64,")
    assert sum(1 for t, _ in parser.tags if t == "table") == 2
    rows = (out / "per_sample.csv").read_text().splitlines()
    assert rows[0].startswith("index,label,clean_correct") and len(rows) == 61
    assert rows[0].endswith(",proven_robust_to_eps") and any(r.endswith(",0.05") for r in rows[1:])
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_no_certify_attacks_every_sample(weights):
    settings = {"attacks": ("fgsm", "square"), "options": (("queries", "200"),), "run_checks": False, "limit": 60}
    certified = audit(str(weights), **settings)
    attacked = audit(str(weights), **settings, certify=False)
    assert attacked["certification"]["method"] == "off"
    assert all(row["certified_accuracy"] is None for row in attacked["worst_case"])

    def square_attacked(report: dict) -> int:
        return sum(r["attacked"] for r in report["results"] if r["attack"] == "robustkit:square")
    assert square_attacked(certified) < square_attacked(attacked)
    for proven, plain in zip(certified["worst_case"], attacked["worst_case"]):
        assert proven["certified_accuracy"] <= plain["robust_accuracy"]


def test_interrupted_audit_writes_partial_report(weights, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = PGD.run

    def interrupting_run(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PGD, "run", interrupting_run)
    out = tmp_path / "partial"
    result = invoke_audit(weights, "--eps", "0.05,0.1", "--limit", "60", "--attack", "fgsm", "--attack", "pgd",
                          "--out", str(out))
    assert result.exit_code == 130, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False
    done = {(r["attack"], r["eps"]) for r in report["results"]}
    assert ("robustkit:fgsm", 0.05) in done and ("robustkit:pgd", 0.05) in done
    assert ("robustkit:pgd", 0.1) not in done
    assert "interrupted" in (out / "report.html").read_text()


class RecordingBar:
    """Stands in for the rich progress display: records how far each update takes the bar."""

    def __init__(self) -> None:
        self.completed, self.trail = 0.0, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description, total):
        self.total = total
        return 0

    def advance(self, task, amount):
        self.completed += amount
        self.trail.append(self.completed)

    def update(self, task, description=None, completed=None):
        if completed is not None:
            self.completed = completed
            self.trail.append(completed)


def test_progress_moves_batch_by_batch_within_a_run_over_every_eps(monkeypatch):
    bar = RecordingBar()
    monkeypatch.setattr("robustkit.audit.engine.progress", lambda: bar)
    model, data = trained_digits_model("cnn"), load_digits()
    eps = [0.1, 0.2, 0.3, 0.4]
    suite = [NamedAttack("grey", Fade(towards_grey=True, per_sample_eps=True))]
    evaluate(model, data.x[:150], data.y[:150], suite, [ThreatModel(Norm.LINF, e) for e in eps], batch_size=32)
    batches = len(suite[0].attack.calls)  # one run over every eps, in batches of 4 x 32 samples
    assert batches > 1
    assert bar.trail == sorted(bar.trail) and len(bar.trail) == batches + 1  # each batch, then the exact end
    assert 0 < bar.trail[0] < 1 and bar.trail[-1] == bar.total == len(eps)


def test_each_eps_is_evaluated_once_in_ascending_order():
    model, data = trained_digits_model("cnn"), load_digits()
    threats = [ThreatModel.parse(text) for text in ("linf:0.1", "linf:2/255", "linf:0.1")]
    evaluation = evaluate(model, data.x[:20], data.y[:20], [NamedAttack("fgsm", FGSM())], threats)
    assert evaluation.eps == [2 / 255, 0.1]  # one report row per eps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "pgdd"], "unknown attack 'pgdd'; did you mean"),
        (["--eps", "-0.1"], "eps must be >= 0"),
        (["-o", "stepz", "3"], "no attack in this audit has that parameter; did you mean 'steps'? valid keys: "),
        (["--threat", "l2", "--attack", "noise"], "noise:noise does not support l2; it supports linf"),
    ],
)
def test_bad_input_gives_one_line_errors(weights, args, message):
    plugins = Path(__file__).parents[1] / "examples" / "plugins_dir"  # noise: a linf-only attack
    result = CliRunner().invoke(cli, ["--plugins-dir", str(plugins), "audit", str(weights), "--arch",
                                      "builtin:digits-cnn", *args])
    assert result.exit_code == (2 if args[0] in ("--eps", "-o") else 1)  # a bad option value is a usage error
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_wrong_input_shape_is_one_line_error(weights, tmp_path):
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.random.rand(20, 64).astype(np.float32), y=np.zeros(20, dtype=np.int64))
    result = invoke_audit(weights, "--data", str(flat))
    assert result.exit_code == 1
    assert "N x C x H x W" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(weights, tmp_path, run_robustkit):
    common = [
        "audit",
        str(weights),
        "--arch",
        "builtin:digits-cnn",
        "--eps",
        "0.05,0.1",
        "--limit",
        "80",
        "--attack",
        "fgsm",
        "--attack",
        "pgd",
        "--attack",
        "square",  # gradient-free with per-sample radii: one run for both eps, its rows dealt out
        "-o",
        "steps",
        "5",
        "-o",
        "queries",
        "60",
        "--batch-size",
        "16",
        "--no-checks",
    ]
    env = {"ROBUSTKIT_DISABLE_PLUGINS": "art,torchattacks", "PATH": "/usr/bin:/bin"}
    single = run_robustkit(*common, "--out", tmp_path / "one", env=env)
    assert single.returncode == 0, single.stderr
    multi = run_robustkit(*common, "--out", tmp_path / "two", processes=2, env=env)
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert "terminate called" not in multi.stderr  # every rank ended its process group cleanly
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert [(r["attack"], r["eps"], r["robust_accuracy"]) for r in one["results"]] == [
        (r["attack"], r["eps"], r["robust_accuracy"]) for r in two["results"]
    ]
    assert one["worst_case"] == two["worst_case"]
