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
- ``SubstitutionSearch`` (``text:swap``): the same beam search over token substitutions, but
  every allowed single substitution of each beam text is scored exactly by a forward pass while
  a text has at most ``pool`` of them: at k = 1 it is exhaustive, so its result is EXACT, where
  HotFlip's first-order ranking can miss the one swap that breaks a text (seen ranked 975th of
  ~1000). Over the cap its pool is HotFlip's best per position plus a seeded random sample, and
  its notes say the search was not exhaustive. Needs scores only while exhaustive.
- ``RandomSubstitution``: random token substitutions, the baseline HotFlip must beat.

``text_attacks`` builds the default set (audit, harden's summary and export's quick figure all
take it) and ``cascade`` runs it outside an audit.
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
    notes: list[str] = field(default_factory=list)  #: what the report must say about the search (not exhaustive...)
    capped: Tensor | None = None  #: (N,) bool: the k = 1 search of the sample was not exhaustive; None: n/a


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """True-class logit minus the best other: below zero means misclassified."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return true - other


def flips_allowed(model: TextClassifier, current: Tensor, originals: Tensor, usable: Tensor,
                  allowed: Tensor | None) -> Tensor:
    """(rows x L x V) mask of the single substitutions each text of ``current`` may take: a usable
    position (``usable``, rows x L) to a non-special token other than the one there, of the
    original token's kind (a word start for a word start, a ``##piece`` for a piece: else the
    substitution glues or splits words, and the text has more edits than counted), and, with a
    substitution list (``allowed``, V x V), one the original token (``originals``) may become."""
    mask = usable.unsqueeze(-1) & model.same_kind(originals)
    mask[..., sorted(model.special_ids)] = False
    mask.scatter_(2, current.unsqueeze(-1), False)  # the token it already is
    if allowed is not None:
        mask &= allowed.to(current.device)[originals]
    return mask


def first_order_gain(model: TextClassifier, current: Tensor, labels: Tensor) -> Tensor:
    """HotFlip's estimate (rows x L x V) of the loss gained by each single substitution:
    ``(E[w] - E[x_i]) . dL/de_i`` from the model's own input-embedding matrix (one backward pass)."""
    weight = model.embedding.weight.detach()
    delta = torch.zeros(*current.shape, weight.shape[1], device=current.device, requires_grad=True)
    with perturbed(model.embedding, delta):
        loss = F.cross_entropy(model(current), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, delta)
    return grad @ weight.T - (grad * weight[current]).sum(-1, keepdim=True)


@dataclass
class _Proposals:
    """Single substitutions of a depth's beam texts to score exactly: text row, position, token."""

    source: Tensor
    position: Tensor
    word: Tensor
    queries: int = 0  #: forward (and backward) passes' samples spent choosing them


class _BeamSearch(Configurable):
    """Beam search over token substitutions, one per depth: at each depth every beam text of a
    sample proposes single substitutions (``_propose``), all are scored exactly by the model's
    margin, a sample is broken when its best is misclassified, and the ``beam`` best distinct
    texts are kept. HotFlip and the exact search differ only in what they propose."""

    allowed: Tensor | None

    def _propose(self, model: TextClassifier, current: Tensor, labels: Tensor, mask: Tensor,
                 samples: Tensor, depth: int) -> _Proposals:
        raise NotImplementedError

    def _chunk(self, length: int, vocab: int) -> int:
        """Samples searched at once: bounds the (beam x L x V) tensors held together."""
        return max(1, GAIN_ELEMENTS // (self.params.beam * length * vocab))

    def _finish(self, result: TextAttackResult, budgets: Tensor) -> TextAttackResult:
        return result

    def run(self, model: TextClassifier, ids: Tensor, y: Tensor, budgets: Tensor) -> TextAttackResult:
        started = time.perf_counter()
        device = model.embedding.weight.device
        broken_at = torch.full((len(ids),), NEVER)
        adversarial: list[str | None] = [None] * len(ids)
        queries = 0
        chunk = self._chunk(ids.shape[1], model.embedding.weight.shape[0])
        with eval_mode(model):
            for start in range(0, len(ids), chunk):
                rows = torch.arange(start, min(start + chunk, len(ids)))
                found, texts, asked = self._search(model, ids[rows].to(device), y[rows].to(device),
                                                   budgets[rows].long(), rows)
                broken_at[rows] = found
                for row, text in zip(rows.tolist(), texts):
                    adversarial[row] = text
                queries += asked
        return self._finish(TextAttackResult(broken_at, adversarial, time.perf_counter() - started, queries),
                            budgets)

    def _search(self, model: TextClassifier, x: Tensor, y: Tensor, budgets: Tensor, rows: Tensor
                ) -> tuple[Tensor, list[str | None], int]:
        n, length = x.shape
        beam = self.params.beam
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
            usable = (editable[active].repeat_interleave(beam, 0) & ~changed[active].flatten(0, 1)
                      & live[active].flatten().unsqueeze(1))
            mask = flips_allowed(model, current, x[active].repeat_interleave(beam, 0), usable, self.allowed)
            proposed = self._propose(model, current, labels, mask, rows[active.cpu()].repeat_interleave(beam), depth)
            queries += proposed.queries
            source, position = proposed.source, proposed.position
            candidates = current[source].clone()
            candidates[torch.arange(len(source)), position] = proposed.word
            flipped = changed[active].flatten(0, 1)[source].clone()
            flipped[torch.arange(len(source)), position] = True
            slot = source // beam  # candidates come in row order, so each sample's are contiguous
            scores, asked = _scores(model, candidates, labels[source], slot,
                                    budgets.to(x.device)[active] == depth)
            queries += asked
            # each sample's candidates, best (lowest margin) first
            order = scores.argsort(stable=True)
            order = order[slot[order].argsort(stable=True)]
            counts = torch.bincount(slot, minlength=len(active)).tolist()
            for (sample, own) in zip(active.tolist(), order.split(counts)):
                if len(own) and scores[own[0]] < 0:  # the best flip at this depth breaks it
                    searching[sample] = False
                    broken_at[sample] = depth
                    texts[sample] = model.decode(candidates[own[0]].unsqueeze(0))[0]
                    continue
                kept: list[int] = []
                seen: set[tuple[int, ...]] = set()
                for index in own.tolist():
                    if len(kept) == beam:
                        break
                    key = tuple(candidates[index].tolist())
                    if key not in seen:
                        seen.add(key)
                        kept.append(index)
                if not kept:
                    searching[sample] = False  # nothing left to flip
                    continue
                live[sample] = False
                live[sample, : len(kept)] = True
                beams[sample, : len(kept)] = candidates[kept]
                changed[sample, : len(kept)] = flipped[kept]
        return broken_at, texts, queries


#: Candidates per sample scored per round at a sample's last depth, which stops at its first break.
ROUND = 256


def _scores(model: TextClassifier, candidates: Tensor, labels: Tensor, slot: Tensor, last: Tensor
            ) -> tuple[Tensor, int]:
    """Margins of ``candidates`` (grouped by sample, ``slot``, each group best-guess first) and the
    number scored. A sample at its ``last`` depth needs only to know whether any candidate breaks
    it, so its candidates are scored ``ROUND`` at a time until one does; the rest stay +inf
    (never chosen). Every candidate of an unbroken sample is scored: an exhaustive pool stays so."""
    scores = torch.full((len(candidates),), float("inf"), device=candidates.device)
    if not len(candidates):
        return scores, 0
    first = torch.zeros(len(last), dtype=torch.long, device=slot.device)  # a sample's first candidate
    first.scatter_reduce_(0, slot, torch.arange(len(slot), device=slot.device), "amin", include_self=False)
    rank = torch.arange(len(slot), device=slot.device) - first[slot]
    done = torch.zeros(len(first), dtype=torch.bool, device=slot.device)
    step = ROUND if bool(last.any()) else len(candidates)
    asked = 0
    for low in range(0, int(rank.max()) + 1, step):
        chosen = ((rank >= low) & (rank < low + step) & ~done[slot]).nonzero().squeeze(1)
        if not len(chosen):
            break
        scores[chosen] = margins(_logits(model, candidates[chosen]).to(candidates.device), labels[chosen])
        asked += len(chosen)
        hit = torch.zeros_like(done)
        hit[slot[chosen][scores[chosen] < 0]] = True
        done |= hit & last.to(done.device)
    return scores, asked


def _logits(model: TextClassifier, ids: Tensor, batch_size: int = 512) -> Tensor:
    """``predict_logits`` with each batch cut after its last real token when the network takes
    the attention mask (padding is masked out, so the logits are the same up to rounding): the
    candidates of short texts cost what their length does, not the longest text's."""
    if not model.takes_mask:
        return predict_logits(model, ids, batch_size)
    real = ids != model.pad_id
    extent = torch.where(real.any(1), ids.shape[1] - real.flip(1).long().argmax(1), 1)
    order = extent.argsort()
    parts = [predict_logits(model, ids[rows, : int(extent[rows].max())], batch_size)
             for rows in order.split(batch_size)]
    if not parts:
        return torch.empty(0, 0)
    out = torch.empty(len(ids), parts[0].shape[1], device=parts[0].device)
    out[order] = torch.cat(parts)
    return out


@dataclass(frozen=True)
class HotFlipParams:
    beam: int = param(3, "beam width: texts kept per depth of the search")
    candidates: int = param(8, "best first-order flips of each beam that are scored exactly")

    def __post_init__(self) -> None:
        if self.beam < 1 or self.candidates < 1:
            raise ValueError("beam and candidates must be >= 1")


class HotFlip(_BeamSearch):
    name = "hotflip"
    summary = "gradient-guided token substitution with beam search (Ebrahimi et al., 2018)"
    Params = HotFlipParams
    needs_gradients: ClassVar[bool] = True

    def __init__(self, params: HotFlipParams | None = None, /, *, allowed: Tensor | None = None,
                 **overrides: object) -> None:
        super().__init__(params, **overrides)
        self.allowed = allowed  #: V x V: may token i become token j (the substitution list); None: any

    def _propose(self, model: TextClassifier, current: Tensor, labels: Tensor, mask: Tensor,
                 samples: Tensor, depth: int) -> _Proposals:
        gain = first_order_gain(model, current, labels).masked_fill(~mask, float("-inf"))
        top = gain.flatten(1).topk(min(self.params.candidates, gain[0].numel()), dim=1)
        valid = torch.isfinite(top.values).flatten()
        vocab = gain.shape[2]
        source = torch.arange(len(current), device=current.device).repeat_interleave(top.indices.shape[1])
        return _Proposals(source[valid], (top.indices // vocab).flatten()[valid],
                          (top.indices % vocab).flatten()[valid], len(current))


@dataclass(frozen=True)
class SwapParams:
    beam: int = param(3, "beam width: texts kept per depth of the search")
    pool: int = param(20_000, "most single substitutions of a text scored exactly per depth: a text with more is "
                              "searched over a capped pool (first-order best plus a random sample), not exhaustively")
    guided: int = param(16, "over the cap: best first-order substitutions per position kept in the pool")
    seed: int = param(0, "seed of the random part of a capped pool")

    def __post_init__(self) -> None:
        if self.beam < 1 or self.pool < 1 or self.guided < 0:
            raise ValueError("beam and pool must be >= 1, guided >= 0")


#: Candidate texts' token ids the exact search holds at once (bounds the samples searched together).
CANDIDATE_ELEMENTS = 1 << 24


class SubstitutionSearch(_BeamSearch):
    """Exact-scoring token substitution: at each depth every allowed single substitution of each
    beam text is scored by a real forward pass (its margin), no first-order estimate, while a
    text has at most ``pool`` of them; so at k = 1 the search is exhaustive and its result EXACT
    (over the substitutions whose text re-tokenises to them). A text with more gets a capped pool
    (HotFlip's ``guided`` best per position plus a seeded random sample of the rest, ``pool`` in
    all), and the result says so in its notes: then it is an upper bound like any attack's."""

    name = "swap"
    summary = "token substitution scored by real forward passes: exhaustive (exact at k = 1) up to -o pool"
    Params = SwapParams
    #: exhaustive pools need scores only (first-order gains only order them); capped pools use gradients to choose
    needs_gradients: ClassVar[bool] = False

    def __init__(self, params: SwapParams | None = None, /, *, allowed: Tensor | None = None,
                 **overrides: object) -> None:
        super().__init__(params, **overrides)
        self.allowed = allowed
        self.capped: set[int] = set()  #: samples whose depth-1 pool was capped in the last run
        self.capped_deeper: set[int] = set()  #: samples capped at a depth > 1

    def _chunk(self, length: int, vocab: int) -> int:
        per_sample = self.params.beam * min(self.params.pool, length * vocab) * length
        return max(1, min(super()._chunk(length, vocab), CANDIDATE_ELEMENTS // per_sample))

    def run(self, model: TextClassifier, ids: Tensor, y: Tensor, budgets: Tensor) -> TextAttackResult:
        self.capped, self.capped_deeper = set(), set()
        self._generator = torch.Generator().manual_seed(self.params.seed)
        return super().run(model, ids, y, budgets)

    def _propose(self, model: TextClassifier, current: Tensor, labels: Tensor, mask: Tensor,
                 samples: Tensor, depth: int) -> _Proposals:
        sizes = mask.flatten(1).sum(1)
        over = (sizes > self.params.pool).nonzero().squeeze(1)
        # first-order gains (one backward pass per text) order each pool best guess first, so a
        # sample at its last depth stops at its first break; they choose nothing in an exhaustive pool
        gain = first_order_gain(model, current, labels).masked_fill(~mask, float("-inf"))
        queries = len(current)
        if len(over):
            (self.capped if depth == 1 else self.capped_deeper).update(samples[over.cpu()].tolist())
            chosen = torch.zeros_like(mask[over])
            positions = mask[over].any(2).sum(1).clamp(min=1)
            for i, row in enumerate(over.tolist()):
                per_position = min(self.params.guided, self.params.pool // 2 // int(positions[i]))
                if per_position:
                    top = gain[row].topk(min(per_position, gain.shape[2]), dim=1)
                    chosen[i].scatter_(1, top.indices, torch.isfinite(top.values))
                rest = torch.rand(mask.shape[1:], generator=self._generator).to(mask.device)
                rest = rest.masked_fill(~mask[row] | chosen[i], -1.0).flatten()
                picked = rest.topk(max(0, self.params.pool - int(chosen[i].sum()))).indices
                chosen[i].view(-1)[picked[rest[picked] >= 0]] = True
            mask = mask.clone()
            mask[over] = chosen
        source, position, word = mask.nonzero(as_tuple=True)
        order = gain[source, position, word].argsort(descending=True, stable=True)
        order = order[(source[order] // self.params.beam).argsort(stable=True)]  # by sample, best guess first
        return _Proposals(source[order], position[order], word[order], queries)

    def _finish(self, result: TextAttackResult, budgets: Tensor) -> TextAttackResult:
        searched = int((budgets > 0).sum())
        if self.capped:
            result.notes.append(
                f"text:swap was NOT exhaustive at k = 1 on {len(self.capped)} of {searched} texts: they have more "
                f"single substitutions than -o pool {self.params.pool}, so only the first-order best "
                f"{self.params.guided} per position and a random sample were scored; its k = 1 figure is an upper "
                "bound, not exact (raise -o pool to search them all)")
        else:
            result.notes.append(
                f"text:swap searched every single substitution of each of the {searched} texts it attacked at k = 1 "
                f"(at most -o pool {self.params.pool} each, scored by forward passes until one broke the text): its "
                "k = 1 result is EXACT over token substitutions (k >= 2 is a beam search, an upper bound)")
        if self.capped_deeper:
            result.notes.append(f"text:swap capped its pool at depths >= 2 on {len(self.capped_deeper)} texts")
        result.capped = torch.zeros(len(budgets), dtype=torch.bool)
        if self.capped:
            result.capped[sorted(self.capped)] = True
        return result


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
                        choices = choices[model.continues_word[choices] == model.continues_word[ids[row, p]]]
                        if len(choices):  # none of the token's kind (word start or piece): left as it is
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


def text_attacks(allowed: Tensor | None = None, *, beam: int = 3, candidates: int = 8, pool: int = 20_000,
                 char_ops: str = ",".join(CHAR_OPS), seed: int = 0) -> dict[str, Configurable]:
    """The default text attack set, in cascade order (cheap first): what an audit's worst case,
    harden's before/after summary and export's quick figure all take, so that no figure comes
    from a weaker set. ``text:swap`` last: it scores exactly only what the others left."""
    return {"hotflip": HotFlip(beam=beam, candidates=candidates, allowed=allowed),
            "charbug": CharBug(char_ops=char_ops, seed=seed),
            "swap": SubstitutionSearch(beam=beam, pool=pool, seed=seed, allowed=allowed)}


def run_attack(attack: Configurable, model: TextClassifier, ids: Tensor, y: Tensor, texts: Sequence[str],
               budgets: Tensor) -> TextAttackResult:
    """Run one attack of ``text_attacks``: the character attack on the texts and scores, the
    token attacks on the ids."""
    if isinstance(attack, CharBug):
        return attack.run(model.classify, texts, y, budgets)
    assert isinstance(attack, _BeamSearch | RandomSubstitution)
    return attack.run(model, ids, y, budgets)


def cascade(attacks: dict[str, Configurable], model: TextClassifier, ids: Tensor, y: Tensor, top: int
            ) -> tuple[Tensor, list[str]]:
    """Each sample's fewest edits (up to ``top``) any of ``attacks`` needed, run in order, each
    asked only for the edits below what the earlier ones needed; clean mistakes are 0. Returns
    it and the attacks' notes (e.g. whether text:swap's k = 1 search was exhaustive)."""
    right = (predict_logits(model, ids).argmax(1).cpu() == y.cpu()) if len(ids) else torch.zeros(0, dtype=torch.bool)
    worst = torch.where(right, torch.tensor(NEVER), torch.tensor(0.0))
    texts = model.decode(ids)
    notes: list[str] = []
    for attack in attacks.values():
        own = (worst.clamp(max=top + 1) - 1).clamp(min=0).long()
        result = run_attack(attack, model, ids, y, texts, own)
        worst = torch.minimum(worst, torch.where(own > 0, result.broken_at, torch.tensor(NEVER)))
        notes += result.notes
    return worst, notes
