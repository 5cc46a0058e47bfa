"""Hugging Face sequence classifiers, loaded safely, as modules that take token ids.

A model folder is what ``save_pretrained`` writes: ``config.json``, ``model.safetensors`` and
the tokenizer's files. Weights are read from safetensors only (``use_safetensors=True``), from
the folder only (``local_files_only=True``), and a model whose config asks for its own code
(``auto_map``) is refused unless ``--trust-code`` was given.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustkit.data import Dataset
from robustkit.errors import RobustkitError
from robustkit.models.base import LoadedModel, LoadOptions, file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from robustkit_text.data import TextDataset

FORMAT = "huggingface"
PICKLE_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
#: Longest sequence a data set is padded to when neither tokenizer nor config says less.
MAX_LENGTH = 512


class TextClassifier(nn.Module):
    """A sequence classifier as robustkit sees models: a batch in, fp32 logits out.

    The batch is padded token ids (N x L); the attention mask is ``ids != pad``. Ids may
    arrive as floats (``predict_logits`` casts every input to fp32; ids below 2**24 are exact).
    The tokenizer travels with the module, so attacks can decode and re-encode text.
    """

    def __init__(self, net: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        config = getattr(net, "config", None)
        limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.max_length = min([MAX_LENGTH] + [int(v) for v in limits if isinstance(v, int) and v > 0])

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        return self.net(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits.float()

    @property
    def embedding(self) -> nn.Embedding:
        """The input (word) embedding: attacks read its matrix, defences perturb its output."""
        layer = self.net.get_input_embeddings()  # type: ignore[operator]
        assert isinstance(layer, nn.Embedding)
        return layer

    def encode(self, texts: Sequence[str], length: int | None = None) -> Tensor:
        """Token ids (N x L, int64), padded (and cut) to ``length``, else to the longest text;
        never longer than the model's maximum length."""
        limit = min(length or self.max_length, self.max_length)
        batch = self.tokenizer(list(texts), truncation=True, max_length=limit, return_attention_mask=False)
        width = limit if length else max((len(r) for r in batch["input_ids"]), default=1)
        ids = torch.full((len(texts), width), self.pad_id)
        for row, encoded in enumerate(batch["input_ids"]):
            ids[row, : len(encoded)] = torch.tensor(encoded)
        return ids

    def decode(self, ids: Tensor) -> list[str]:
        return [str(self.tokenizer.decode([int(t) for t in row if int(t) not in self.special_ids])) for row in ids]

    def editable(self, ids: Tensor) -> Tensor:
        """Mask (N x L) of positions an attack may change: real tokens, not padding or [CLS]."""
        special = torch.tensor(sorted(self.special_ids), device=ids.device)
        return ~torch.isin(ids.long(), special)

    def classify(self, texts: Sequence[str]) -> Tensor:
        """fp32 logits of raw texts (the score-only view that black-box attacks use)."""
        device = next(self.parameters()).device
        with torch.no_grad():
            return self(self.encode(texts).to(device)).cpu()


@contextmanager
def perturbed(embedding: nn.Module, delta: Tensor) -> Iterator[None]:
    """Add ``delta`` (N x L x d) to the embedding layer's output for the forward passes of the
    block: how HotFlip reads gradients and FGM, PGD and FreeLB perturb, whatever wraps the model
    (DDP included), since the hook sits on the layer itself."""
    handle = embedding.register_forward_hook(lambda _module, _inputs, output: output + delta.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


def is_model_folder(ref: str) -> bool:
    path = Path(ref).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


def is_text_folder(ref: str) -> bool:
    """A model folder with tokenizer files: a text model (image folders have a processor instead)."""
    return is_model_folder(ref) and any((Path(ref).expanduser() / name).is_file() for name in TOKENIZER_FILES)


def load_folder(ref: str, options: LoadOptions) -> LoadedModel:
    """Load a ``save_pretrained`` folder as a ``TextClassifier``; one-line refusals otherwise."""
    path = Path(ref).expanduser()
    weights = path / "model.safetensors"
    if not weights.is_file():
        pickles = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
        if pickles:
            raise RobustkitError(
                f"{ref} holds only pickle weights ({pickles[0]}), which can run code when read; save them as "
                "safetensors (model.save_pretrained(folder, safe_serialization=True))"
            )
        raise RobustkitError(f"{ref} has config.json but no model.safetensors; save the model with save_pretrained")
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise RobustkitError(f"{ref}/config.json is not valid JSON ({err})") from None
    if config.get("auto_map") and not options.trust_code:
        raise RobustkitError(f"{ref} asks to run its own Python code (auto_map in config.json); pass --trust-code "
                             "if you trust it")
    if not is_text_folder(ref):
        raise RobustkitError(f"{ref} has no tokenizer files; save the tokenizer beside the model "
                             "(tokenizer.save_pretrained(folder))")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        net = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, local_files_only=True, trust_remote_code=options.trust_code)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=options.trust_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RobustkitError(f"{ref}: transformers cannot load it as a sequence classifier ({first})") from None
    if tokenizer.pad_token_id is None:
        raise RobustkitError(f"{ref}: the tokenizer has no padding token; set one (tokenizer.pad_token = ...) "
                             "and save it again")
    notes = ["ran the model's own code (--trust-code)"] if config.get("auto_map") else []
    return LoadedModel(TextClassifier(net.eval(), tokenizer), str(path), FORMAT, file_sha256(weights),
                       trusted_code=bool(config.get("auto_map")), notes=notes)


def as_classifier(loaded: LoadedModel, ref: str) -> TextClassifier:
    model = loaded.model
    if not isinstance(model, TextClassifier):
        raise RobustkitError(f"{ref} is not a text classifier; give a Hugging Face sequence-classification folder "
                             "(config.json, model.safetensors, tokenizer files)")
    return model


def encode_data(model: TextClassifier, data: TextDataset) -> Dataset:
    """Both splits as token ids of one length (the longest text, at most the model's maximum),
    in robustkit's ``Dataset``: what the training loop and the attacks take."""
    texts = data.texts + (data.train_texts or [])
    ids = model.encode(texts)
    n = len(data.texts)
    train = data.train_texts is not None and data.train_labels is not None
    return Dataset(data.name, ids[:n], torch.tensor(data.labels), data.num_classes,
                   ids[n:] if train else None, torch.tensor(data.train_labels) if train else None,
                   source=data.source or data.name)
