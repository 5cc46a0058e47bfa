"""Text classifiers, loaded safely, as modules that take token ids.

Two kinds of model are text classifiers. A Hugging Face folder is what ``save_pretrained``
writes: ``config.json``, ``model.safetensors`` and the tokenizer's files. Weights are read from
safetensors only (``use_safetensors=True``), from the folder only (``local_files_only=True``),
and a model whose config asks for its own code (``auto_map``) is refused unless
``--trust-code`` was given. A user's own torch module comes from robustkit's loader (weights
with ``--arch``) and is wrapped when the data is text, with the tokenizer saved beside its
weights file (``as_classifier``); it follows ``CONVENTION``.
"""
from __future__ import annotations

import inspect
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
#: The weights file of a model folder, and of the folder harden writes for a torch module.
WEIGHTS_FILE = "model.safetensors"
#: Longest sequence a data set is padded to when neither tokenizer nor config says less.
MAX_LENGTH = 512
#: How a text classifier's network is called, said wherever a module does not follow it.
CONVENTION = ("net(input_ids), or net(input_ids, attention_mask=mask) when its forward takes attention_mask, "
              "returning (N, C) logits or an object with .logits")
#: What fixes a tokenizer without a padding token, for either kind of tokenizer file.
PAD_FIX = ("set one (tokenizer.pad_token = ... with transformers, tokenizer.enable_padding(pad_id=..., "
           "pad_token=...) with tokenizers) and save it again")


class TextClassifier(nn.Module):
    """A sequence classifier as robustkit sees models: a batch in, fp32 logits out.

    The batch is padded token ids (N x L); the attention mask is ``ids != pad``. Ids may
    arrive as floats (``predict_logits`` casts every input to fp32; ids below 2**24 are exact).
    The tokenizer travels with the module, so attacks can decode and re-encode text. ``net`` is
    a Hugging Face model or any module that follows ``CONVENTION``; its input embedding is
    ``get_input_embeddings()`` if it defines one, else its only ``nn.Embedding``.
    ``hf_folder``: loaded from a ``save_pretrained`` folder, and saved back as one; otherwise
    the module's state dict is what ``--arch`` rebuilds.
    """

    def __init__(self, net: nn.Module, tokenizer: PreTrainedTokenizerBase, hf_folder: bool = False) -> None:
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.hf_folder = hf_folder
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.embedding_path = _embedding_path(net)
        self.takes_mask = _takes_mask(net)
        # a tokenizers file names its [CLS]/[UNK] only as special added tokens; embedding rows past
        # the vocabulary (sizes rounded up) spell no text: neither may an attack write or change
        special = {*tokenizer.all_special_ids, *(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)}
        self.special_ids = frozenset(int(i) for i in special) | frozenset(
            range(len(tokenizer), self.embedding.num_embeddings))
        config = getattr(net, "config", None)
        limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.max_length = min([MAX_LENGTH] + [int(v) for v in limits if isinstance(v, int) and v > 0])

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        logits = self.call(ids, (ids != self.pad_id).long())
        if logits.dim() != 2 or len(logits) != len(ids):
            raise RobustkitError(f"{type(self.net).__name__} returns shape {tuple(logits.shape)} for {len(ids)} texts; "
                                 f"a text classifier is called as {CONVENTION}")
        return logits

    def call(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The network called by ``CONVENTION`` (the ONNX graph's body): fp32 logits. A network that
        takes no mask gets the padding id wherever the mask is 0: a no-op on robustkit's batches
        (mask = ids != pad), and what keeps the mask an input of its ONNX graph."""
        if self.takes_mask:
            out = self.net(input_ids, attention_mask=attention_mask)
        else:
            out = self.net(input_ids.masked_fill(attention_mask == 0, self.pad_id))
        logits = getattr(out, "logits", out)
        if not isinstance(logits, Tensor):
            raise RobustkitError(f"{type(self.net).__name__} returns a {type(out).__name__}; a text classifier is "
                                 f"called as {CONVENTION}")
        return logits.float()

    @property
    def embedding(self) -> nn.Embedding:
        """The input (word) embedding: attacks read its matrix, defences perturb its output."""
        if self.embedding_path is None:
            layer = self.net.get_input_embeddings()  # type: ignore[operator]
        else:
            layer = self.net.get_submodule(self.embedding_path)
        if not isinstance(layer, nn.Embedding):
            raise RobustkitError(f"{type(self.net).__name__}.get_input_embeddings() returns {type(layer).__name__}; "
                                 "return the torch.nn.Embedding that embeds the token ids")
        return layer

    def describe(self) -> list[str]:
        """How the network is used, for the report's model notes (nothing here is silent)."""
        call = "net(input_ids, attention_mask=mask)" if self.takes_mask else "net(input_ids)"
        where = "get_input_embeddings()" if self.embedding_path is None else self.embedding_path
        notes = [f"called as {call}; input embedding: {where}"]
        if self.max_length == MAX_LENGTH and not 0 < getattr(self.tokenizer, "model_max_length", 0) <= MAX_LENGTH:
            notes.append(f"texts cut to {MAX_LENGTH} tokens: neither the tokenizer nor the model sets a maximum length")
        return notes

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


def _embedding_path(net: nn.Module) -> str | None:
    """Where ``net`` embeds the token ids: None when ``get_input_embeddings()`` says (Hugging Face
    models define it), else the name of its only ``nn.Embedding``; a guess among several could
    perturb a position embedding and report numbers of another threat."""
    if callable(getattr(net, "get_input_embeddings", None)):
        return None
    found = [name for name, module in net.named_modules() if isinstance(module, nn.Embedding)]
    if len(found) == 1:
        return found[0]
    what = f"{len(found)} torch.nn.Embedding layers ({', '.join(found)})" if found else "no torch.nn.Embedding"
    raise RobustkitError(f"{type(net).__name__} has {what}; text attacks and defences need the embedding of the "
                         "token ids: define get_input_embeddings() returning that nn.Embedding")


def _takes_mask(net: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):  # no Python signature (a TorchScript module): called with the ids only
        return False


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
    weights = path / WEIGHTS_FILE
    if options.arch:
        raise RobustkitError(f"--arch does not apply to {ref}: a Hugging Face folder names its architecture in "
                             "config.json; drop --arch")
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
        raise RobustkitError(f"{ref}: transformers cannot load it as a sequence classifier ({_reason(err)})") from None
    _check_padding(tokenizer, ref)
    notes = ["ran the model's own code (--trust-code)"] if config.get("auto_map") else []
    return LoadedModel(TextClassifier(net.eval(), tokenizer, hf_folder=True), str(path), FORMAT,
                       file_sha256(weights), trusted_code=bool(config.get("auto_map")), notes=notes)


def as_classifier(loaded: LoadedModel, ref: str) -> TextClassifier:
    """The loaded model as a text classifier. A Hugging Face folder is one already; a torch module
    from robustkit's loader (weights with ``--arch``) is wrapped, with the tokenizer saved beside
    its weights file, and how it is called goes into the report's model notes."""
    model = loaded.model
    if isinstance(model, TextClassifier):
        return model
    if loaded.normalisation is not None:
        raise RobustkitError(f"{ref}: a mean/std normalisation (--mean/--std or the file's metadata) does not apply "
                             "to token ids; drop --mean/--std")
    weights = Path(loaded.source)
    if not isinstance(model, nn.Module) or not weights.is_file():
        raise RobustkitError(f"{ref} is not a text classifier; give a Hugging Face sequence-classification folder, "
                             "or torch weights with --arch and the tokenizer saved beside them")
    classifier = TextClassifier(model, load_tokenizer(weights.parent, ref)).eval()  # as load_model left the net
    loaded.model = classifier
    loaded.notes += classifier.describe()
    return classifier


def load_tokenizer(folder: Path, ref: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a weights file: ``save_pretrained``'s files, else a ``tokenizers``
    ``tokenizer.json``. No code of its own runs (``trust_remote_code=False``)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise RobustkitError(f"{ref}: no tokenizer beside the weights in {folder}/; save the model's tokenizer there "
                             "(tokenizer.save(folder/'tokenizer.json') or tokenizer.save_pretrained(folder))")
    try:
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        else:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    except Exception as err:  # transformers' OSError/ValueError, tokenizers' own Exception on a bad file
        raise RobustkitError(f"{ref}: cannot load the tokenizer in {folder}/ ({_reason(err)})") from None
    _check_padding(tokenizer, ref)
    return tokenizer


def _check_padding(tokenizer: PreTrainedTokenizerBase, ref: str) -> None:
    """Batches are padded with the tokenizer's own padding token: a guessed one would feed the
    model ids it never saw after a text."""
    if tokenizer.pad_token_id is None:
        raise RobustkitError(f"{ref}: the tokenizer has no padding token; {PAD_FIX}")


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
