"""Inputs a new user gives the text plugin: unknown words, substitution lists that miss the
vocabulary, odd labels and rows, flags a text audit does not take, classes the model lacks,
RoBERTa's position offset, texts cut to the maximum length, a tokenizer asking for its own code,
and the README's onnxruntime snippet."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from robustkit_text import synthetic
from robustkit_text.attacks import NEVER, HotFlip
from robustkit_text.data import load_text_data
from robustkit_text.model import TextClassifier, as_classifier, encode_data
from robustkit_text.threat import allowed_matrix, token_edits
from torch import nn

from robustkit import LoadOptions, load_model
from robustkit.cli import cli
from robustkit.errors import DataError, OptionError, RobustkitError

README = Path(__file__).resolve().parents[1] / "README.md"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def classifier(folder: Path) -> TextClassifier:
    model = load_model(str(folder), LoadOptions()).model
    assert isinstance(model, TextClassifier)
    return model


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


# --- A: unknown words, [UNK] positions, word pieces ---------------------------------------------


def test_an_unknown_word_leaves_hotflip_its_successes(trained_model: Path, data_folder: Path, tmp_path: Path) -> None:
    model = classifier(trained_model)
    text = load_text_data(str(data_folder), limit=40)
    texts = ["zzqx " + t for t in text.texts]  # one unknown word per text
    ids, y = model.encode(texts), torch.tensor(text.labels)
    assert bool((ids == model.unk_id).any(1).all())
    right = model(ids).argmax(1) == y
    result = HotFlip().run(model, ids[right], y[right], torch.full((int(right.sum()),), 2))
    broken = (result.broken_at < NEVER).nonzero().squeeze(1).tolist()
    assert len(broken) > 0.5 * int(right.sum())  # decode used to drop [UNK]: every success was rejected
    adversarial = [str(result.adversarial[i]) for i in broken]
    again = model.encode(adversarial, length=ids.shape[1])
    assert bool((token_edits(ids[right][broken], again) <= result.broken_at[broken]).all())
    assert bool((model.classify(adversarial).argmax(1) != y[right][broken]).all())


def test_decode_from_the_original_keeps_its_unchanged_words_verbatim(fresh_model: Path) -> None:
    model = classifier(fresh_model)
    original = "Zzqx, the FILM was  good!  " + "the plot was bad " * 40  # past the maximum length
    ids = model.encode([original])
    tokens = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert tokens[1] == "[UNK]" and tokens[4] == "film"
    edited = ids.clone()
    edited[0, 4] = model.tokenizer.convert_tokens_to_ids("plot")
    edited[0, 1] = model.tokenizer.convert_tokens_to_ids("bad")  # an unknown word replaced: a substitution
    rebuilt = model.decode(edited, [original])[0]
    assert rebuilt == "bad, the plot was  good!  " + "the plot was bad " * 40
    assert torch.equal(model.encode([rebuilt]), edited)
    assert model.decode(ids, [original]) == [original]
    # without the original the [UNK] stays a token: the positions survive re-tokenising
    assert torch.equal(model.encode(model.decode(ids)), ids)


def test_unknown_words_are_editable_and_special_tokens_are_not(fresh_model: Path) -> None:
    model = classifier(fresh_model)
    ids = model.encode(["zzqx the film", "the film was good and great"])
    editable = model.editable(ids)
    unk = ids == model.unk_id
    assert bool(unk.any()) and bool(editable[unk].all())
    fixed = torch.isin(ids, torch.tensor(sorted(model.special_ids - {model.unk_id})))
    assert bool(fixed.any()) and not bool(editable[fixed].any())  # [CLS], [SEP], [PAD]
    assert model.unk_id in model.special_ids  # never a substitution's target
    assert not bool(model.continues_word.any())  # a word-level vocabulary has no word pieces


class _Bag(nn.Module):
    """A torch-module classifier over a word-piece vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab + 3, 8)  # rows past the vocabulary, as rounded-up sizes give
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids).mean(1))


def word_piece_classifier() -> TextClassifier:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "walk", "talk", "the", "dog", "##ing", "##ed", "##s"]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    return TextClassifier(_Bag(len(words)), tokenizer)


def test_substitutions_can_keep_the_word_piece_kind() -> None:
    model = word_piece_classifier()
    vocab = model.tokenizer.get_vocab()
    continues = model.continues_word
    assert continues.shape == (model.embedding.num_embeddings,)
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if continues[i]] == ["##ing", "##ed", "##s"]
    ids = model.encode(["the dog walking"])  # [CLS] the dog walk ##ing [SEP]
    same = model.same_kind(ids)
    assert same.shape == (1, ids.shape[1], model.embedding.num_embeddings)
    assert bool(same[0, 4, vocab["##ed"]]) and not bool(same[0, 4, vocab["talk"]])  # ##ing -> ##ed, not talk
    assert bool(same[0, 3, vocab["talk"]]) and not bool(same[0, 3, vocab["##s"]])  # walk -> talk, not ##s
    edited = ids.clone()
    edited[0, 4], edited[0, 3] = vocab["##ed"], vocab["talk"]
    assert model.decode(edited, ["the dog walking"]) == ["the dog talked"]
    assert model.surface(vocab["##ing"]) == "ing"


def test_the_attacks_substitute_only_tokens_of_the_same_kind() -> None:
    """A word start never becomes a ##piece nor the reverse (that would glue or split words and
    count as one edit): in the attacks' substitution mask and in the random baseline."""
    from robustkit_text.attacks import RandomSubstitution, flips_allowed

    model = word_piece_classifier()
    vocab = model.tokenizer.get_vocab()
    ids = model.encode(["the dog walking"] * 4)  # [CLS] the dog walk ##ing [SEP]
    mask = flips_allowed(model, ids, ids, model.editable(ids), None)
    assert bool(mask[0, 4, vocab["##ed"]]) and not bool(mask[0, 4, vocab["talk"]])
    assert bool(mask[0, 3, vocab["talk"]]) and not bool(mask[0, 3, vocab["##s"]])
    kinds = model.continues_word
    for seed in range(5):
        attack = RandomSubstitution(tries=16, seed=seed)
        result = attack.run(model, ids, torch.tensor([5, 5, 5, 5]), torch.full((4,), 2))  # no class 5: all break
        for text in result.adversarial:
            assert text is not None
            edited = model.encode([text])[0]
            assert bool((kinds[edited[: ids.shape[1]]] == kinds[ids[0]]).all()), text


# --- B: substitution lists ------------------------------------------------------------------------


def test_a_substitution_list_without_usable_words_is_refused(fresh_model: Path, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    model = classifier(fresh_model)
    vocab, size = model.tokenizer.get_vocab(), model.embedding.num_embeddings
    with pytest.raises(OptionError, match=r"none of the list's 2 words is usable \(e\.g\. 'not good' is not in"):
        allowed_matrix({"good": ["not good", "b a d"], "zzz": ["bad"]}, vocab, size)
    with caplog.at_level(logging.WARNING, logger="robustkit_text.threat"):
        _, words = allowed_matrix({"good": ["bad"], "zzz": ["bad"], "yyy": ["bad"]}, vocab, size)
    assert words == 1 and "only 1 of the list's 3 words are usable (e.g. 'zzz'" in caplog.text


def test_the_audit_refuses_an_unusable_substitution_list(fresh_model: Path, tmp_path: Path) -> None:
    data = synthetic.write_jsonl(tmp_path / "d.jsonl", ["the film was good", "the plot was bad"], [1, 0])
    subs = tmp_path / "subs.json"
    subs.write_text(json.dumps({"good": ["not good", "meh"], "zzz": ["bad"]}))
    result = invoke("audit", str(fresh_model), "--data", str(data), "--eps", "1", "-o", "substitutions", str(subs),
                    "-o", "embedding_eps", "")
    assert result.exit_code == 2, result.output
    assert "none of the list's 2 words is usable" in result.output


# --- C: labels and rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["--1", "\u00b2", "1_0", "\u0661", "1.0", "+-1", "0x1"])
def test_odd_labels_are_one_line_errors_naming_the_line(tmp_path: Path, label: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(f"text,label\nthe film was good,1\nthe plot was bad,{label}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv line 3: label .* is not an integer class index"):
        load_text_data(str(path))


def test_rows_with_other_cell_counts_are_refused_naming_the_line(tmp_path: Path) -> None:
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\nthe plot was bad,0\nthe film was good,1,extra\n")
    with pytest.raises(DataError, match=r"extra\.csv line 3: 3 cells but the header names 2 columns; quote"):
        load_text_data(str(extra))
    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\nthe film was good\nthe plot was bad,0\n")
    with pytest.raises(DataError, match=r"missing\.csv line 2: 1 cell but the header names 2 columns"):
        load_text_data(str(missing))


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "the film\u2028was good", "label": 1}\r\n{"text": "the plot\x85was bad", "label": 0}\n',
                    encoding="utf-8")
    data = load_text_data(str(path))
    assert data.texts == ["the film\u2028was good", "the plot\x85was bad"] and data.labels == [1, 0]


def test_a_label_the_model_has_no_class_for_names_its_line(fresh_model: Path, tmp_path: Path) -> None:
    path = synthetic.write_jsonl(tmp_path / "d.jsonl", ["the film was good", "the plot was bad", "the film"],
                                 [1, 0, 2])
    loaded = load_model(str(fresh_model), LoadOptions())
    model = as_classifier(loaded, str(fresh_model))
    with pytest.raises(DataError, match=r"d\.jsonl line 3: label 2 is out of range: the model has 2 outputs"):
        encode_data(model, load_text_data(str(path)))


# --- D: options a text audit does not take --------------------------------------------------------


@pytest.mark.parametrize("flags", [("--black-box",), ("--suite", "quick"), ("--threat", "l2"),
                                   ("--precision", "bf16")])
def test_image_audit_flags_are_refused(fresh_model: Path, data_folder: Path, flags: tuple[str, ...]) -> None:
    result = invoke("audit", str(fresh_model), "--data", str(data_folder), "--eps", "1", *flags)
    assert result.exit_code == 2, result.output
    assert f"{' '.join(flags)} does not apply to a text audit; text audits run text:hotflip" in result.output


@pytest.mark.parametrize("key,value", [("embedding_eps", "abc"), ("embedding_eps", "-1"), ("embedding_eps", "0"),
                                       ("embedding_steps", "0"), ("embedding_steps", "-3"), ("char_ops", "fly")])
def test_malformed_text_options_exit_2(fresh_model: Path, data_folder: Path, key: str, value: str) -> None:
    result = invoke("audit", str(fresh_model), "--data", str(data_folder), "--eps", "1", "-o", key, value)
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output


def test_an_unknown_attack_is_exit_1_listing_the_known_ones(fresh_model: Path, data_folder: Path) -> None:
    result = invoke("audit", str(fresh_model), "--data", str(data_folder), "--attack", "text:nope")
    assert result.exit_code == 1, result.output
    assert "unknown attack 'text:nope'" in result.output and "text:hotflip, text:charbug" in result.output


# --- E: harden's classes, RoBERTa's positions, truncation notes -----------------------------------


def test_harden_refuses_classes_the_model_lacks(fresh_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "three"
    folder.mkdir()
    synthetic.write_jsonl(folder / "train.jsonl", ["the film was good", "the plot was bad", "the film"] * 4,
                          [1, 0, 2] * 4)
    synthetic.write_jsonl(folder / "test.jsonl", ["the film was good", "the film"], [1, 2])
    result = invoke("harden", str(fresh_model), "--data", str(folder), "--defence", "text:plain", "--epochs", "1",
                    "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert "test.jsonl line 2: label 2 is out of range: the model has 2 outputs" in result.output
    assert "IndexError" not in result.output and "failed" not in result.output


def test_roberta_positions_start_after_the_padding_index(tmp_path: Path, reviews: synthetic.SyntheticText,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = synthetic.build_tokenizer(reviews.train_texts)
    tokenizer.model_max_length = int(1e30)  # as a tokenizer saved without a maximum length
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=20, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "roberta"
    RobertaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), LoadOptions())
    model = as_classifier(loaded, str(folder))
    assert model.max_length == 20 - tokenizer.pad_token_id - 1
    path = synthetic.write_jsonl(tmp_path / "long.jsonl", ["the film was good " * 20, "the plot was bad"], [1, 0])
    with caplog.at_level(logging.WARNING, logger="robustkit_text.model"):
        data = encode_data(model, load_text_data(str(path)))  # ran the model: no "index out of range"
    assert data.x.shape[1] == model.max_length
    note = f"1 of 2 texts are longer than the model's maximum length and were cut to their first {model.max_length}"
    assert any(n.startswith(note) for n in loaded.notes) and note in caplog.text


def test_the_truncation_note_reaches_the_report_of_a_hugging_face_folder(fresh_model: Path, tmp_path: Path) -> None:
    path = synthetic.write_jsonl(tmp_path / "d.jsonl", ["the film was good " * 30, "the plot was bad"], [1, 0])
    out = tmp_path / "report"
    result = invoke("audit", str(fresh_model), "--data", str(path), "--eps", "1", "--attack", "text:charbug",
                    "-o", "embedding_eps", "", "--no-checks", "--out", str(out))
    assert result.exit_code in (0, 3), result.output
    notes = json.loads((out / "report.json").read_text())["model"]["notes"]
    assert any(n.startswith("1 of 2 texts are longer than the model's maximum length and were cut to their "
                            "first 64 tokens") for n in notes), notes


# --- F: a tokenizer's own code, the README's onnxruntime snippet ----------------------------------


def test_a_tokenizer_asking_for_its_own_code_is_refused(fresh_model: Path, tmp_path: Path) -> None:
    folder = copy_folder(fresh_model, tmp_path / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTok", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(RobustkitError, match=r"auto_map in tokenizer_config\.json\); pass --trust-code"):
        load_model(str(folder), LoadOptions())


def test_the_readme_onnxruntime_snippet_runs_on_an_export(fresh_model: Path, tmp_path: Path) -> None:
    data = synthetic.write_jsonl(tmp_path / "d.jsonl", ["the film was good", "the plot was bad"] * 3, [1, 0] * 3)
    stem = tmp_path / "exports" / "reviews"
    result = invoke("export", str(fresh_model), "--data", str(data), "--samples", "6", "--no-audit", "-o", "dynamo",
                    "false", "--out", f"{stem}.onnx")
    assert result.exit_code == 0, result.output
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(b for b in blocks if "InferenceSession" in b)
    assert "max_length=512" not in snippet
    long = "the film was good " * 100  # longer than the model's 64 positions
    code = snippet.replace("exports/reviews", str(stem)).replace('["a lovely film"]', f'["a lovely film", "{long}"]')
    scope: dict[str, object] = {}
    exec(compile(code, "README snippet", "exec"), scope)  # the README's own code
    assert getattr(scope["logits"], "shape", None) == (2, 2) and scope["labels"] == ["LABEL_0", "LABEL_1"]
