"""The text audit as robustkit's: its report from the core's builder, partial results on Ctrl-C,
transformers' noise held back (what matters said as a note), text:sentiment in the data-set
list without passing for images, export's hint fitted to the report's kind; and the core's
suite planning, which the report builder change touched."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from robustkit_text.attacks import CharBug
from robustkit_text.quiet import quiet_transformers

from robustkit.audit.run import AuditConfig, plan_suite
from robustkit.cli import cli
from robustkit.data import load_dataset
from robustkit.errors import DataError, RobustkitError
from robustkit.export.run import check_report_matches
from robustkit.threat import Norm

#: A short text audit: no embedding-space diagnostic, few samples.
QUICK = ("--eps", "1,2", "--limit", "30", "-o", "embedding_eps", "")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def headless_model(tmp_path_factory: pytest.TempPathFactory, fresh_model: Path) -> Path:
    """``fresh_model`` saved without its classifier head, as a base model (BertModel) is."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("headless")
    for file in fresh_model.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = load_file(fresh_model / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def test_ctrl_c_during_the_attacks_leaves_a_partial_report(trained_model: Path, data_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report"
    left: dict = {}

    def interrupted(*args: object, **kwargs: object) -> None:  # text:charbug runs after text:hotflip
        left.update(json.loads((out / "report.json").read_text()))  # what a Ctrl-C here leaves on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(CharBug, "run", interrupted)
    result = invoke("audit", str(trained_model), "--data", str(data_folder), *QUICK, "--out", str(out))
    assert result.exit_code == 130, result.output
    assert "INCOMPLETE: the audit was interrupted" in result.output
    final = json.loads((out / "report.json").read_text())
    for report in (left, final):
        assert report["complete"] is False and report["threat"]["norm"] == "edits"
        assert {(r["attack"], r["eps"]) for r in report["results"]} == {("text:hotflip", 1.0), ("text:hotflip", 2.0)}
        assert report["worst_case"] == []  # text:charbug finished no budget: no worst case is claimed
    assert "interrupted" in (out / "report.md").read_text()
    assert len((out / "per_sample.csv").read_text().splitlines()) == 31


def test_text_report_comes_from_the_core_builder(trained_model: Path, data_folder: Path) -> None:
    result = invoke("audit", str(trained_model), "--data", str(data_folder), *QUICK, "--attack", "text:charbug",
                    "--mode", "per-attack", "--no-checks", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["sanity checks"] == "untested"  # said as for image audits, not left out
    assert [(r["attack"], r["norm"], r["gradients"], r["scope"]) for r in report["results"]] == [
        ("text:charbug", "edits", False, "single attack")] * 2
    assert report["certification"]["method"] == "off (no certificates for text)"
    assert report["config"]["attacks"] == ["text:charbug"] and report["data"]["limit"] == 30


def test_quiet_transformers_turns_what_matters_into_notes() -> None:
    from transformers.utils import logging as hf_logging

    library = hf_logging.get_logger("transformers")  # configured on first use: the state to restore is after that
    before = (library.handlers[:], library.level, library.propagate)
    with quiet_transformers() as notes:
        logging.getLogger("transformers.modeling_utils").warning(
            "Some weights of BertForSequenceClassification were not initialized from the model checkpoint at m and "
            "are newly initialized: ['classifier.bias', 'classifier.weight']\nYou should probably TRAIN this model")
        logging.getLogger("transformers.tokenization_utils_base").warning("an unrelated remark")
    assert len(notes) == 1 and "lacks classifier.bias, classifier.weight" in notes[0] and "untrained" in notes[0]
    assert (library.handlers, library.level, library.propagate) == before


def test_loading_says_untrained_weights_in_robustkit_words(headless_model: Path) -> None:
    """A fresh process, as a user runs it: transformers' own lines never reach the terminal."""
    run = subprocess.run([sys.executable, "-m", "robustkit", "audit", str(headless_model), "--data", "text:sentiment",
                          "--limit", "20", "--eps", "1", "--no-checks", "-o", "embedding_eps", "", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert "Some weights" not in run.stderr and "newly initialized" not in run.stderr, run.stderr
    assert "the checkpoint lacks classifier.bias, classifier.weight" in run.stderr  # robustkit's warning
    report = json.loads(run.stdout)
    assert any("untrained" in note for note in report["notes"]), report["notes"]
    assert any("untrained" in note for note in report["model"]["notes"])


def test_an_untrained_model_fails_the_chance_check_with_a_text_fix(fresh_model: Path, data_folder: Path) -> None:
    """The fix names what puts a text classifier at chance, not the image causes (--mean/--std)."""
    result = invoke("audit", str(fresh_model), "--data", str(data_folder), *QUICK, "--json")
    report = json.loads(result.stdout)
    (chance,) = [c for c in report["checks"] if c["name"] == "clean accuracy above chance"]
    assert chance["status"] == "fail" and "the model is trained (robustkit harden)" in chance["detail"], chance
    assert "--mean/--std" not in chance["detail"] and result.exit_code != 0


def test_sentiment_is_listed_as_text_data() -> None:
    listed = invoke("datasets", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["text:sentiment"]["kind"] == "text" and rows["robustkit:digits"]["kind"] == "image"
    assert "2,000 training, 300 evaluation, 2 classes (negative, positive)" in rows["text:sentiment"]["summary"]
    table = invoke("datasets", "list").stdout
    assert "text:sentiment" in table and "synthetic template reviews" in table


def test_image_jobs_refuse_text_data_in_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from robustkit.models.zoo import digits_cnn

    weights = tmp_path / "digits.safetensors"
    save_file(digits_cnn().state_dict(), weights)
    for data in ("text:sentiment", "sentiment"):  # the text audit's refusal; robustkit's loader's
        result = invoke("audit", str(weights), "--arch", "builtin:digits-cnn", "--data", data)
        assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
        assert len(result.output.strip().splitlines()) == 1 and "text" in result.output
    with pytest.raises(DataError, match=r"text:sentiment is text, not images: give it with a text classifier"):
        load_dataset("text:sentiment")


@pytest.mark.parametrize(("norm", "hint"), [("edits", "check --data against"),
                                            ("linf", "check --mean/--std and --data against")])
def test_report_mismatch_hint_fits_the_report(norm: str, hint: str) -> None:
    model = torch.nn.Linear(2, 2)
    x, y = torch.randn(50, 2), torch.zeros(50, dtype=torch.long)
    y[model(x).argmax(1) == 0] = 1  # every prediction wrong: 0% here, 100% in the report
    report = {"clean_accuracy": 1.0, "n": 50, "threat": {"norm": norm}}
    with pytest.raises(RobustkitError, match=hint) as caught:
        check_report_matches(report, model, x, y)
    assert norm != "edits" or "--mean" not in str(caught.value)


def test_a_named_suite_says_what_it_left_out() -> None:
    suite, note = plan_suite(AuditConfig(model="unused", norm=Norm.L1), white_box=True)
    assert note is not None and note.startswith("suite default: ") and "do not support l1 and were not run" in note
    left_out = note.partition(": ")[2].partition(" do not")[0].split(", ")
    assert left_out and not set(left_out) & {a.name for a in suite}
    assert plan_suite(AuditConfig(model="unused", attacks=("apgd",), norm=Norm.L1), white_box=True)[1] is None
