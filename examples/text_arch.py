"""Your own torch text classifier in robustkit: the calling convention, by example.

    python examples/text_arch.py --out text-model     # fresh weights + tokenizer for the synthetic reviews
    robustkit audit text-model/weights.safetensors --arch examples/text_arch.py:factory --data text:sentiment
    robustkit harden text-model/weights.safetensors --arch examples/text_arch.py:factory --data text:sentiment \\
        --defence text:fgm --out hard/
    robustkit audit hard/model/model.safetensors --arch examples/text_arch.py:factory --data text:sentiment

With text data, robustkit's text plugin takes any ``nn.Module`` that

- is called as ``net(input_ids)``, or ``net(input_ids, attention_mask=mask)`` when its forward has
  an ``attention_mask`` parameter (int64, N x L, 1 on real tokens, 0 on padding);
- returns logits (N, C), or an object with ``.logits`` (as Hugging Face models do);
- embeds the ids with one ``nn.Embedding`` (or says which with ``get_input_embeddings()``):
  HotFlip reads its matrix, the defences perturb its output;

with the weights as safetensors (or a ``state_dict`` .pt) named by ``--arch FILE.py:factory``,
and its tokenizer saved beside the weights file (``tokenizer.save(folder / "tokenizer.json")``
from ``tokenizers``, or ``save_pretrained(folder)``), with a padding token.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

#: Rows of the embedding: at least the tokenizer's vocabulary (rows past it are never attacked).
VOCAB_SIZE = 128
NUM_CLASSES = 2


class TextCNN(nn.Module):
    """Embedding, one convolution over 3-token windows, mean over the real tokens, linear. Padding
    is zeroed before the convolution, so a text's logits do not depend on how far it is padded."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, dim: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).unsqueeze(-1).float()
        hidden = torch.relu(self.conv((self.embed(input_ids) * mask).transpose(1, 2))).transpose(1, 2)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def factory() -> TextCNN:
    """What ``--arch examples/text_arch.py:factory`` builds (robustkit then loads the weights into it)."""
    return TextCNN()


def write_model(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """Fresh (untrained) weights as ``weights.safetensors`` and a WordLevel tokenizer over ``texts``
    as ``tokenizer.json`` beside them; returns the weights file."""
    from robustkit_text.synthetic import build_tokenizer
    from safetensors.torch import save_file

    tokenizer = build_tokenizer(texts).backend_tokenizer  # the tokenizers library's own object
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")  # names the padding token
    if tokenizer.get_vocab_size() > VOCAB_SIZE:
        raise SystemExit(f"{tokenizer.get_vocab_size()} tokens do not fit the embedding's {VOCAB_SIZE} rows")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    save_file(factory().state_dict(), str(folder / "weights.safetensors"))
    return folder / "weights.safetensors"


def main(argv: list[str] | None = None) -> Path:
    from robustkit_text.synthetic import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("text-model"), help="folder for the weights and tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    weights = write_model(args.out, generate().train_texts, args.seed)  # text:sentiment's training texts
    print(f"{weights} and its tokenizer.json written; audit it with:\n"
          f"robustkit audit {weights} --arch {Path(__file__).as_posix()}:factory --data text:sentiment")
    return weights


if __name__ == "__main__":
    main()
