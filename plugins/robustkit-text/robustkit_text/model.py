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
import logging
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

log = logging.getLogger(__name__)

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
        #: the unknown-word token: never written by an attack, but its positions are words of the
        #: text (replacing an unknown word by a known one is a substitution), so they are editable
        self.unk_id = _unk_id(tokenizer)
        #: (V,) bool over the embedding rows: the token continues a word (WordPiece's ``##ing``; a
        #: byte-level or SentencePiece token without its word-start marker). A substitution keeps
        #: the kind of the token it replaces (``same_kind``), else it glues or splits words.
        self.continuation_prefix = _continuation_prefix(tokenizer)
        self.continues_word = _continues_word(tokenizer, self.embedding.num_embeddings, self.special_ids,
                                              self.continuation_prefix)
        self.position_limit = _position_limit(net)
        limits = [self.position_limit, getattr(tokenizer, "model_max_length", None)]
        self.max_length = min([MAX_LENGTH] + [int(v) for v in limits if isinstance(v, int) and v > 0])
        #: notes for the report's model notes (the loaded model's list: texts cut to the maximum length)
        self.notes: list[str] = []

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
        if (self.max_length == MAX_LENGTH and not 0 < getattr(self.tokenizer, "model_max_length", 0) <= MAX_LENGTH
                and not 0 < (self.position_limit or 0) <= MAX_LENGTH):
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

    def decode(self, ids: Tensor, texts: Sequence[str] | None = None) -> list[str]:
        """The texts of token ids (N x L), one per row, that re-tokenise to the same positions.

        With ``texts``, the originals the rows were edited from, each text is its original with
        only the changed tokens' spans replaced (the tokenizer's offset mapping): every unchanged
        word stays verbatim, an unknown word and the tail past the maximum length included.
        Without them (or with a slow tokenizer, which has no offsets) the ids are spelled by the
        tokenizer, an [UNK] as the unknown token itself, so that no position goes missing."""
        if texts is None or not getattr(self.tokenizer, "is_fast", False):
            return [self._spell(row) for row in ids]
        return [self._rebuild(text, row) for text, row in zip(texts, ids)]

    def _spell(self, row: Tensor) -> str:
        kept = [int(t) for t in row if int(t) not in self.special_ids or int(t) == self.unk_id]
        return str(self.tokenizer.decode(kept, clean_up_tokenization_spaces=False))

    def _rebuild(self, text: str, row: Tensor) -> str:
        encoded = self.tokenizer(text, truncation=True, max_length=self.max_length, return_offsets_mapping=True,
                                 return_attention_mask=False)
        original, spans = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        new = [int(t) for t in row]
        if len(new) < len(original) or any(t != self.pad_id for t in new[len(original):]):
            return self._spell(row)  # not an edit of this text's positions
        pieces, cursor = [], 0
        for position, (old, token) in enumerate(zip(original, new)):
            if old == token:
                continue
            start, end = spans[position]
            if start == end or start < cursor:  # a special position, or a span shared with an earlier token
                return self._spell(row)
            pieces += [text[cursor:start], self.surface(token)]
            cursor = end
        return "".join(pieces) + text[cursor:]

    def surface(self, token: int) -> str:
        """How ``token`` is written in a text: a continuation piece without its prefix (``##ing``
        is ``ing``), a word without its word-start marker or the space it stands for."""
        spelled = str(self.tokenizer.decode([token], clean_up_tokenization_spaces=False))
        prefix = self.continuation_prefix
        if prefix and bool(self.continues_word[token]) and spelled.startswith(prefix):
            spelled = spelled[len(prefix):]
        return spelled.strip()

    def editable(self, ids: Tensor) -> Tensor:
        """Mask (N x L) of positions an attack may change: real tokens, not padding or [CLS];
        an [UNK] is a word of the text, so it may be replaced (no attack writes one)."""
        special = torch.tensor(sorted(self.special_ids - {self.unk_id}), device=ids.device)
        return ~torch.isin(ids.long(), special)

    def same_kind(self, ids: Tensor) -> Tensor:
        """Mask (N x L x V) of the tokens that may replace each position's token: those of its kind
        (word start or continuation, ``continues_word``), so that no substitution glues or splits
        words. Special tokens and rows past the vocabulary are not excluded here (``special_ids``)."""
        kinds = self.continues_word.to(ids.device)
        return kinds[ids.long()].unsqueeze(-1) == kinds

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


def _backend(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A fast tokenizer's ``tokenizer.json`` as a dict ({} for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        return dict(json.loads(backend.to_str())) if backend is not None else {}
    except (ValueError, AttributeError):
        return {}


def _unk_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The unknown-word token's id: the tokenizer's ``unk_token``, else the one its model names
    (a ``tokenizers`` file loaded without ``unk_token=`` knows it only there)."""
    if tokenizer.unk_token_id is not None:
        return int(tokenizer.unk_token_id)
    name = _backend(tokenizer).get("model", {}).get("unk_token")
    found = tokenizer.convert_tokens_to_ids(name) if isinstance(name, str) else None
    return int(found) if isinstance(found, int) else None


def _continuation_prefix(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The prefix a word-continuing piece is spelled with (WordPiece's ``##``), if any."""
    model = _backend(tokenizer).get("model", {})
    prefix = model.get("continuing_subword_prefix")
    if isinstance(prefix, str) and prefix:
        return prefix
    if hasattr(tokenizer, "wordpiece_tokenizer"):  # a slow BertTokenizer
        return "##"
    return None


def _word_start_marker(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The marker of a word-start piece: byte-level BPE's ``Ġ`` (a space), SentencePiece's ``▁``."""
    backend = _backend(tokenizer)
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                found.append("\u0120")
            elif node.get("type") == "Metaspace":
                found.append(str(node.get("replacement", "\u2581")))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(backend.get("pre_tokenizer"))
    if not backend and hasattr(tokenizer, "sp_model"):  # a slow SentencePiece tokenizer
        found.append("\u2581")
    return found[0] if found else None


def _continues_word(tokenizer: PreTrainedTokenizerBase, size: int, special: frozenset[int],
                    prefix: str | None) -> Tensor:
    """(size,) bool: the token continues a word. WordPiece: spelled with the continuation prefix;
    byte-level BPE and SentencePiece: spelled without the word-start marker (a text's first word
    carries none in byte-level BPE: its pieces and continuations are one kind, as they are for
    re-tokenising); a word-level vocabulary: none. Special and added tokens start words."""
    flags = torch.zeros(size, dtype=torch.bool)
    marker = None if prefix else _word_start_marker(tokenizer)
    if prefix is None and marker is None:
        return flags
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    for token, index in tokenizer.get_vocab().items():
        if 0 <= index < size and index not in special and index not in added:
            flags[index] = token.startswith(prefix) if prefix else not token.startswith(str(marker))
    return flags


def _position_limit(net: nn.Module) -> int | None:
    """The longest sequence the network's position embeddings take: ``max_position_embeddings``,
    less the offset of RoBERTa-style models (their position ids start after the padding index,
    at ``padding_idx + 1``: 512 tokens of RoBERTa's 514 positions)."""
    positions = getattr(getattr(net, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    for module in net.modules():
        layer = getattr(module, "position_embeddings", None)
        if isinstance(layer, nn.Embedding) and layer.padding_idx is not None:
            return max(1, positions - int(layer.padding_idx) - 1)
    return positions


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
    tokenizer_code = _tokenizer_auto_map(path, ref)
    if tokenizer_code and not options.trust_code:
        raise RobustkitError(f"{ref} asks to run its own Python code (auto_map in tokenizer_config.json); pass "
                             "--trust-code if you trust it")
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
    trusted = bool(config.get("auto_map")) or tokenizer_code
    classifier = TextClassifier(net.eval(), tokenizer, hf_folder=True)
    classifier.notes += ["ran the model's own code (--trust-code)"] if trusted else []
    classifier.notes += classifier.describe()[1:]  # the maximum length's note, if any (the call is transformers')
    return LoadedModel(classifier, str(path), FORMAT, file_sha256(weights), trusted_code=trusted,
                       notes=classifier.notes)


def _tokenizer_auto_map(path: Path, ref: str) -> bool:
    """Whether the folder's tokenizer_config.json asks for the tokenizer's own code (``auto_map``)."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return False
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RobustkitError(f"{ref}/tokenizer_config.json is not valid JSON ({err})") from None
    return isinstance(document, dict) and bool(document.get("auto_map"))


def as_classifier(loaded: LoadedModel, ref: str) -> TextClassifier:
    """The loaded model as a text classifier. A Hugging Face folder is one already; a torch module
    from robustkit's loader (weights with ``--arch``) is wrapped, with the tokenizer saved beside
    its weights file, and how it is called goes into the report's model notes."""
    model = loaded.model
    if isinstance(model, TextClassifier):
        model.notes = loaded.notes  # one list: what encoding the data adds reaches the report's model notes
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
    classifier.notes = loaded.notes  # one list: what encoding the data adds reaches the report's model notes
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
    in robustkit's ``Dataset``: what the training loop and the attacks take. The model is run on
    a few of them first: one-line errors for a model that fails on them and for a label that is
    no class of the model (naming its line); a note (and a warning) when texts were cut to the
    model's maximum length."""
    from robustkit.models.loading import check_model_output
    from robustkit_text.data import check_label_range

    texts = data.texts + (data.train_texts or [])
    ids = model.encode(texts)
    check_label_range(data, check_model_output(model, ids).num_classes)
    note = truncation_note(model, texts, ids)
    if note and note not in model.notes:
        log.warning("%s", note)
        model.notes.append(note)
    n = len(data.texts)
    train = data.train_texts is not None and data.train_labels is not None
    return Dataset(data.name, ids[:n], torch.tensor(data.labels), data.num_classes,
                   ids[n:] if train else None, torch.tensor(data.train_labels) if train else None,
                   source=data.source or data.name)


def truncation_note(model: TextClassifier, texts: Sequence[str], ids: Tensor) -> str | None:
    """The note that some ``texts`` (encoded as ``ids``) were longer than the model's maximum
    length and were cut to it, whatever the kind of model; None when none was."""
    full = ((ids != model.pad_id).sum(1) >= model.max_length).nonzero().squeeze(1).tolist()
    if not full:
        return None
    lengths = model.tokenizer([texts[i] for i in full], truncation=False, verbose=False,
                              return_attention_mask=False)["input_ids"]
    cut = sum(len(row) > model.max_length for row in lengths)
    if not cut:
        return None
    return (f"{cut} of {len(texts)} texts are longer than the model's maximum length and were cut to their first "
            f"{model.max_length} tokens: the accuracies and attacks see only those")
