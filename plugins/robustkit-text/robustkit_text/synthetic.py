"""Honest synthetic data and a tiny transformer, for the tests, the benchmark and the demo.

Nothing can be downloaded here, so the data is generated: short reviews from templates, whose
label is decided by a rule a model can learn: the sentiment words (two fixed lists) are
counted and the majority polarity is the label; every text has a margin of at least two
sentiment words, and neutral distractor words fill the templates. The model is a randomly
initialised 2-layer BERT (hidden 64, 2 heads) with a WordLevel tokenizer trained on the
training texts: it learns the rule in seconds on a CPU. Numbers measured on it say how the
methods compare, not how robust a real text classifier is.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

POSITIVE = ("good", "great", "excellent", "superb", "lovely", "brilliant", "wonderful", "fine", "pleasant",
            "charming", "solid", "delightful")
NEGATIVE = ("bad", "awful", "terrible", "poor", "dull", "boring", "horrible", "weak", "clumsy", "tedious",
            "lousy", "dreadful")
SUBJECTS = ("film", "movie", "plot", "cast", "script", "soundtrack", "ending", "story", "director", "camera",
            "dialogue", "pacing")
FILLERS = ("the", "a", "was", "is", "and", "but", "really", "quite", "very", "overall", "honestly", "i", "think",
           "felt", "seemed", "with", "some", "moments", "of", "scenes", "this", "that", "at", "times", "also")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


@dataclass(frozen=True)
class SyntheticText:
    """Texts and labels (1 positive, 0 negative) of both splits."""

    train_texts: list[str]
    train_labels: list[int]
    texts: list[str]
    labels: list[int]


def _review(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    major, minor = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
    words_major = rng.randint(2, 4)
    words_minor = rng.randint(0, words_major - 2)  # a margin of two or more
    sentiment = [rng.choice(major) for _ in range(words_major)] + [rng.choice(minor) for _ in range(words_minor)]
    rng.shuffle(sentiment)
    parts: list[str] = []
    for word in sentiment:
        parts += ["the", rng.choice(SUBJECTS), rng.choice(("was", "is", "felt", "seemed")), word]
        parts += rng.sample(FILLERS, rng.randint(0, 2))
    return " ".join(parts), label


def generate(n_train: int = 2000, n_eval: int = 300, seed: int = 0) -> SyntheticText:
    """``n_train`` + ``n_eval`` reviews from one seeded generator (the same everywhere)."""
    rng = random.Random(seed)
    train = [_review(rng) for _ in range(n_train)]
    evaluation = [_review(rng) for _ in range(n_eval)]
    return SyntheticText([t for t, _ in train], [y for _, y in train], [t for t, _ in evaluation],
                         [y for _, y in evaluation])


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer (lower-cased whitespace words, ``[CLS] text [SEP]``) over ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)


def save_tiny_model(folder: Path, texts: list[str], num_labels: int = 2, seed: int = 0) -> Path:
    """A fresh 2-layer BERT (hidden 64, 2 heads) and its tokenizer, written as ``save_pretrained``
    writes them (config.json, model.safetensors, tokenizer files)."""
    from transformers import BertConfig, BertForSequenceClassification

    from robustkit.modules import seeded

    tokenizer = build_tokenizer(texts)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, num_labels=num_labels,
                        pad_token_id=tokenizer.pad_token_id)  # type: ignore[call-arg, unused-ignore]  # transformers 5 types it, 4.x not
    with seeded(seed):
        model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, texts: list[str], labels: list[int]) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    return path


def write_folder(folder: Path, data: SyntheticText) -> Path:
    """``train.jsonl`` and ``test.jsonl``: a data folder that ``--data`` takes."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", data.train_texts, data.train_labels)
    write_jsonl(folder / "test.jsonl", data.texts, data.labels)
    return folder
