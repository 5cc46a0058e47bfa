"""Discrete attacks on text classifiers, native, needing no downloaded resources.

Each attack searches for a sample's smallest number of edits, one edit per depth, so one run
with budget k settles every smaller budget (a text broken with j edits is broken at every
k >= j): ``broken_at`` is the number of edits of the first success, ``inf`` when none within
the budget. Budgets are per sample, so a cascade can give a later attack only what the
earlier ones left to find.

- ``HotFlip`` (Ebrahimi et al., 2018): white-box token substitution. The gain of replacing
  token i by word w is estimated to first order from the model's own input-embedding matrix,
  ``(E[w] - E[x_i]) . dL/de_i``; the best estimates of each beam are scored exactly and a beam
  search over positions keeps the best texts by margin.
- ``CharBug`` (Gao et al., 2018, DeepWordBug): black-box, scores only. Words are ranked by the
  drop of the true class's probability when each is removed; the top words then receive one
  character operation each (swap, delete, insert, neighbouring key), the variant that lowers
  the true class most, until the prediction flips or the budget is spent.
- ``RandomSubstitution``: random token substitutions, the baseline HotFlip must beat.
"""
from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.modules import eval_mode, predict_logits
from robustkit.params import Configurable, param
from robustkit_text.model import TextClassifier, perturbed
from robustkit_text.threat import CHAR_OPS, char_variants

NEVER = float("inf")
#: Elements of the (candidates x positions x vocabulary) gain tensor HotFlip holds at once.
GAIN_ELEMENTS = 1 << 24


@dataclass
class TextAttackResult:
    broken_at: Tensor  #: (N,) float: edits of the first success; inf when none within the budget
    adversarial: list[str | None]  #: the adversarial text of each broken sample
    seconds: float = 0.0
    queries: int = 0  #: forward passes' samples (scores asked for)


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """True-class logit minus the best other: below zero means misclassified."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return true - other


@dataclass(frozen=True)
class HotFlipParams:
    beam: int = param(3, "beam width: texts kept per depth of the search")
    candidates: int = param(8, "best first-order flips of each beam that are scored exactly")

    def __post_init__(self) -> None:
        if self.beam < 1 or self.candidates < 1:
            raise ValueError("beam and candidates must be >= 1")


class HotFlip(Configurable):
    name = "hotflip"
    summary = "gradient-guided token substitution with beam search (Ebrahimi et al., 2018)"
    Params = HotFlipParams
    needs_gradients: ClassVar[bool] = True

    def __init__(self, params: HotFlipParams | None = None, /, *, allowed: Tensor | None = None,
                 **overrides: object) -> None:
        super().__init__(params, **overrides)
        self.allowed = allowed  #: V x V: may token i become token j (the substitution list); None: any

    def run(self, model: TextClassifier, ids: Tensor, y: Tensor, budgets: Tensor) -> TextAttackResult:
        started = time.perf_counter()
        device = model.embedding.weight.device
        broken_at = torch.full((len(ids),), NEVER)
        adversarial: list[str | None] = [None] * len(ids)
        queries = 0
        length, vocab = ids.shape[1], model.embedding.weight.shape[0]
        chunk = max(1, GAIN_ELEMENTS // (self.params.beam * length * vocab))
        with eval_mode(model):
            for start in range(0, len(ids), chunk):
                rows = torch.arange(start, min(start + chunk, len(ids)))
                found, texts, asked = self._search(model, ids[rows].to(device), y[rows].to(device),
                                                   budgets[rows].long())
                broken_at[rows] = found
                for row, text in zip(rows.tolist(), texts):
                    adversarial[row] = text
                queries += asked
        return TextAttackResult(broken_at, adversarial, time.perf_counter() - started, queries)

    def _search(self, model: TextClassifier, x: Tensor, y: Tensor, budgets: Tensor
                ) -> tuple[Tensor, list[str | None], int]:
        n, length = x.shape
        beam, per_beam = self.params.beam, self.params.candidates
        weight = model.embedding.weight.detach()
        vocab = weight.shape[0]
        special = torch.tensor(sorted(model.special_ids), device=x.device)
        beams = x.unsqueeze(1).repeat(1, beam, 1)  # n x beam x L
        live = torch.zeros(n, beam, dtype=torch.bool, device=x.device)
        live[:, 0] = True  # depth 0 has one text: the original
        changed = torch.zeros(n, beam, length, dtype=torch.bool, device=x.device)
        editable = model.editable(x)
        searching = budgets.to(x.device) > 0
        broken_at = torch.full((n,), NEVER)
        texts: list[str | None] = [None] * n
        queries = 0
        for depth in range(1, int(budgets.max()) + 1 if len(budgets) else 1):
            active = (searching & (budgets.to(x.device) >= depth)).nonzero().squeeze(1)
            if not len(active):
                break
            current = beams[active].flatten(0, 1)  # (a * beam) x L
            labels = y[active].repeat_interleave(beam)
            delta = torch.zeros(*current.shape, weight.shape[1], device=x.device, requires_grad=True)
            with perturbed(model.embedding, delta):
                loss = F.cross_entropy(model(current), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            queries += len(current)
            gain = grad @ weight.T - (grad * weight[current]).sum(-1, keepdim=True)  # (a*beam) x L x V
            usable = (editable[active].repeat_interleave(beam, 0) & ~changed[active].flatten(0, 1)
                      & live[active].flatten().unsqueeze(1))
            gain = gain.masked_fill(~usable.unsqueeze(-1), float("-inf"))
            gain[..., special] = float("-inf")
            gain.scatter_(2, current.unsqueeze(-1), float("-inf"))  # the token it already is
            if self.allowed is not None:
                originals = x[active].repeat_interleave(beam, 0)
                gain = gain.masked_fill(~self.allowed.to(x.device)[originals], float("-inf"))
            top = gain.flatten(1).topk(min(per_beam, gain[0].numel()), dim=1)
            valid = torch.isfinite(top.values).flatten()
            position, word = (top.indices // vocab).flatten(), (top.indices % vocab).flatten()
            source = torch.arange(len(current), device=x.device).repeat_interleave(top.indices.shape[1])
            candidates = current[source].clone()
            candidates[torch.arange(len(source)), position] = word
            flipped = changed[active].flatten(0, 1)[source].clone()
            flipped[torch.arange(len(source)), position] = True
            scores = torch.full((len(source),), float("inf"), device=x.device)
            if bool(valid.any()):
                logits = predict_logits(model, candidates[valid]).to(x.device)
                scores[valid] = margins(logits, y[active].repeat_interleave(beam * top.indices.shape[1])[valid])
                queries += int(valid.sum())
            per_sample = scores.view(len(active), -1)
            for slot, sample in enumerate(active.tolist()):
                order = per_sample[slot].argsort()
                offset = slot * per_sample.shape[1]
                if per_sample[slot, order[0]] < 0:  # the best flip at this depth breaks it
                    searching[sample] = False
                    broken_at[sample] = depth
                    texts[sample] = model.decode(candidates[offset + order[0]].unsqueeze(0))[0]
                    continue
                kept: list[int] = []
                seen: set[tuple[int, ...]] = set()
                for index in order.tolist():
                    if not torch.isfinite(per_sample[slot, index]) or len(kept) == beam:
                        break
                    key = tuple(candidates[offset + index].tolist())
                    if key not in seen:
                        seen.add(key)
                        kept.append(offset + index)
                if not kept:
                    searching[sample] = False  # nothing left to flip
                    continue
                live[sample] = False
                live[sample, : len(kept)] = True
                beams[sample, : len(kept)] = candidates[kept]
                changed[sample, : len(kept)] = flipped[kept]
        return broken_at, texts, queries


@dataclass(frozen=True)
class RandomParams:
    tries: int = param(8, "random texts drawn per budget")
    seed: int = param(0, "seed of the draws")


class RandomSubstitution(Configurable):
    name = "random"
    summary = "random token substitutions: the baseline a gradient-guided attack must beat"
    Params = RandomParams
    needs_gradients: ClassVar[bool] = False

    def __init__(self, params: RandomParams | None = None, /, *, allowed: Tensor | None = None,
                 **overrides: object) -> None:
        super().__init__(params, **overrides)
        self.allowed = allowed

    def run(self, model: TextClassifier, ids: Tensor, y: Tensor, budgets: Tensor) -> TextAttackResult:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.params.seed)
        vocab = model.embedding.weight.shape[0]
        words = torch.tensor([t for t in range(vocab) if t not in model.special_ids])
        broken_at = torch.full((len(ids),), NEVER)
        adversarial: list[str | None] = [None] * len(ids)
        queries = 0
        for row in range(len(ids)):
            positions = model.editable(ids[row : row + 1])[0].nonzero().squeeze(1)
            if self.allowed is not None:
                positions = positions[self.allowed[ids[row, positions]].any(1)]
            for k in range(1, min(int(budgets[row]), len(positions)) + 1):
                draws = ids[row].repeat(self.params.tries, 1)
                for draw in draws:
                    chosen = positions[torch.randperm(len(positions), generator=generator)[:k]]
                    for p in chosen.tolist():
                        choices = words if self.allowed is None else self.allowed[int(ids[row, p])].nonzero()[:, 0]
                        draw[p] = choices[torch.randint(len(choices), (1,), generator=generator)]
                logits = predict_logits(model, draws)
                queries += len(draws)
                wrong = (logits.argmax(1) != y[row]).nonzero()
                if len(wrong):
                    broken_at[row] = k
                    adversarial[row] = model.decode(draws[int(wrong[0])].unsqueeze(0))[0]
                    break
        return TextAttackResult(broken_at, adversarial, time.perf_counter() - started, queries)


@dataclass(frozen=True)
class CharBugParams:
    char_ops: str = param(",".join(CHAR_OPS), "character operations: swap, delete, insert, substitute")
    variants: int = param(2, "random variants of each operation tried per word")
    seed: int = param(0, "seed of the positions and letters tried")


_WORD = re.compile(r"\S+")


@dataclass
class _Text:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.spans = [m.span() for m in _WORD.finditer(self.text)]

    def without(self, index: int) -> str:
        start, end = self.spans[index]
        return (self.text[:start] + self.text[end:]).strip()

    def replaced(self, index: int, word: str) -> str:
        start, end = self.spans[index]
        return self.text[:start] + word + self.text[end:]


class CharBug(Configurable):
    name = "charbug"
    summary = "black-box character edits on the most important words (DeepWordBug-style, Gao et al., 2018)"
    Params = CharBugParams
    needs_gradients: ClassVar[bool] = False

    def run(self, classify: Callable[[Sequence[str]], Tensor], texts: Sequence[str], y: Tensor,
            budgets: Tensor) -> TextAttackResult:
        """``classify`` maps texts to scores (logits or probabilities): all this attack sees."""
        from robustkit_text.threat import parse_char_ops

        started = time.perf_counter()
        ops = parse_char_ops(self.params.char_ops)
        broken_at = torch.full((len(texts),), NEVER)
        adversarial: list[str | None] = [None] * len(texts)
        queries = 0
        for row, original in enumerate(texts):
            budget, label = int(budgets[row]), int(y[row])
            if budget < 1:
                continue
            rng = random.Random(self.params.seed * 1_000_003 + row)
            current = _Text(original)
            if not current.spans:
                continue
            # importance: how much the true class's probability drops when the word is gone
            probe = [original] + [current.without(i) for i in range(len(current.spans))]
            probability = classify(probe).float().softmax(1)[:, label]
            queries += len(probe)
            order = (probability[0] - probability[1:]).argsort(descending=True).tolist()
            edits = 0
            for index in order:
                if edits == budget:
                    break
                word = current.text[slice(*current.spans[index])]
                options = [current.replaced(index, v) for v in char_variants(word, ops, rng, self.params.variants)]
                if not options:
                    continue
                edits += 1
                scores = classify(options).float()
                queries += len(options)
                best = int(scores.softmax(1)[:, label].argmin())
                current = _Text(options[best])
                if int(scores[best].argmax()) != label:
                    broken_at[row] = edits
                    adversarial[row] = current.text
                    break
        return TextAttackResult(broken_at, adversarial, time.perf_counter() - started, queries)
