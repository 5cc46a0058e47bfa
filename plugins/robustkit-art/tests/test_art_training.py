"""ART's adversarial trainers as training defences: they train a copy, reproducibly, and
the copy is more robust."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from robustkit_art.training import TRAINERS

from robustkit import Defence, RobustkitError, ThreatModel
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.io import LOCK_NAME
from robustkit.plugin.host import Host
from robustkit.testing import trained_digits_model

THREAT = ThreatModel.parse("linf:0.1")
QUICK = {"epochs": 1, "steps": 2}


@pytest.fixture(scope="module")
def host() -> Host:
    return Host()


def _trainer(host: Host, name: str, **settings: object) -> Defence:
    """The trainer with those of ``settings`` it has (fbf has no inner steps)."""
    defence_cls = host.defences.resolve(f"art:{name}").obj
    fields = defence_cls.Params.__dataclass_fields__
    return defence_cls(**{k: v for k, v in settings.items() if k in fields})


@pytest.mark.parametrize("name", sorted(t.name for t in TRAINERS))
def test_trainer_trains_a_copy(host: Host, name: str) -> None:
    entry = host.defences.resolve(f"art:{name}")
    assert entry.obj.kind == "training" and not entry.obj.masks_gradients
    model = trained_digits_model("cnn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = _trainer(host, name, **QUICK).apply(model, load_digits(), threat=THREAT)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert result.model is not model and not result.model.training
    assert any(not torch.equal(state[k], v) for k, v in result.model.state_dict().items())
    assert result.survives_export and result.notes


def test_same_seed_trains_the_same_weights(host: Host) -> None:
    model, data = trained_digits_model("cnn"), load_digits()
    first, again = (_trainer(host, "fbf", epochs=1).apply(model, data, threat=THREAT).model
                    for _ in range(2))
    for (key, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_fast_adversarial_training_raises_robust_accuracy(host: Host) -> None:
    data = load_digits()
    model = trained_digits_model("cnn")
    hardened = _trainer(host, "fbf", epochs=5).apply(model, data, threat=THREAT).model
    pgd = host.attacks.resolve("robustkit:pgd").obj(steps=10)
    before = pgd(model, data.x, data.y, threat=THREAT).robust_accuracy
    after = pgd(hardened, data.x, data.y, threat=THREAT).robust_accuracy
    with torch.no_grad():
        clean = float((hardened(data.x).argmax(1) == data.y).float().mean())
    assert clean > 0.9
    assert after >= before + 0.1, (before, after)


def test_unsupported_setups_are_one_line_errors(host: Host) -> None:
    model, data = trained_digits_model("cnn"), load_digits()
    with pytest.raises(RobustkitError, match="art:trades"):
        _trainer(host, "madry-pgd").apply(model, data, threat=ThreatModel.parse("l2:1"))
    with pytest.raises(RobustkitError, match="targeted"):
        _trainer(host, "fbf").apply(model, data, threat=ThreatModel.parse("linf:0.1", targeted=True))
    with pytest.raises(RobustkitError, match="training split"):
        _trainer(host, "fbf").apply(model, None, threat=THREAT)


def test_harden_refuses_what_arts_own_loop_cannot_do_before_it_starts(tmp_path: Path) -> None:
    """One defence model: an ART trainer runs through `robustkit harden` like robustkit's own
    defences, but its loop has no checkpoints, torchrun or reduced precision. The command
    refuses those settings up front (nothing written), and a plain run says what it lacks."""
    base = ["harden", "builtin:digits-cnn", "--defence", "art:fbf", "-o", "epochs", "1"]
    for extra, named in ((["--precision", "bf16"], "--precision bf16"), (["--compile"], "--compile")):
        out = tmp_path / named.strip("-").replace(" ", "_")
        result = CliRunner().invoke(cli, [*base, *extra, "--out", str(out)])
        assert result.exit_code != 0, result.output
        assert "own loop" in result.output and named in result.output, result.output
        assert not out.exists() or [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written but the lock
    out = tmp_path / "plain"
    result = CliRunner().invoke(cli, [*base, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    gaps = [n for n in summary["notes"] if n.startswith("trained in its own loop")]
    assert any("checkpoints" in n for n in gaps) and any("early stopping" in n for n in gaps), summary["notes"]
    assert "checkpoint" not in summary["outputs"]
    assert all(Path(path).is_file() for path in summary["outputs"].values())
    # --resume has no checkpoint to continue: refused for what it is, not as a missing file
    result = CliRunner().invoke(cli, [*base, "--out", str(out), "--resume"])
    assert result.exit_code != 0 and "--resume" in result.output and "own loop" in result.output, result.output
