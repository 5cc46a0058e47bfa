"""``robustkit audit`` on a text classifier (the ``robustkit_audit_job`` hook).

Robust accuracy is reported per edit budget k (``--eps 1,2,3``: the text analogue of eps),
with Wilson intervals, in robustkit's report (``norm`` "edits"); the plugin's sections state
the threat model, show examples and give the embedding-space PGD diagnostic apart from it.
Each attack finds a sample's smallest number of edits, so a text broken with k edits counts
as broken at every larger k (the cascade). In ``--mode cascade`` a later attack gets, per
sample, only the budget below what the earlier ones needed. Every adversarial text is checked
before it counts: re-tokenised from the string and classified again, its edits counted
(token positions changed, or the character edit distance) against the budget.

The report is robustkit's (``assemble_report``, as for image audits), and so is its handling
of interruptions: a partial report.json is written after each attack, and a Ctrl-C keeps what
finished, marked incomplete.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustkit.audit import checks
from robustkit.audit.engine import NEVER, AttackOutcome, Evaluation
from robustkit.audit.report import AuditReport, Section, SuiteAttackRecord, SuiteRecord
from robustkit.audit.run import (
    AuditConfig,
    assemble_report,
    partial_saver,
    per_sample_rows,
    sanity_checks,
    worst_case_rows,
)
from robustkit.distributed import init_distributed
from robustkit.errors import OptionError
from robustkit.models.loading import check_model_output
from robustkit.modules import predict_logits
from robustkit.params import coerce, param
from robustkit.threat import Norm, ThreatModel
from robustkit_text.attacks import CharBug, HotFlip, RandomSubstitution, TextAttackResult, margins
from robustkit_text.data import load_text_data
from robustkit_text.embedding import pgd, token_norm
from robustkit_text.model import TextClassifier, as_classifier, encode_data
from robustkit_text.quiet import load_quietly
from robustkit_text.threat import (
    TextThreat,
    allowed_matrix,
    load_substitutions,
    osa_distance,
    parse_budgets,
    token_edits,
)

ATTACKS = {"hotflip": HotFlip, "charbug": CharBug}
PLUGIN = "text"


@dataclass(frozen=True)
class TextAuditOptions:
    """``-o KEY VALUE`` of a text audit."""

    substitutions: str = param("", "JSON of word -> allowed replacements for token substitutions ('' any token)")
    beam: int = param(3, "HotFlip's beam width")
    candidates: int = param(8, "HotFlip's exactly scored flips per beam")
    char_ops: str = param("swap,delete,insert,substitute", "the character attack's operations")
    embedding_eps: str = param("0.25,0.5,1", "radii of the embedding-space PGD diagnostic, in units of the mean "
                                             "token norm like the defences' --eps ('' skips it)")
    embedding_steps: int = param(10, "steps of the embedding-space PGD diagnostic")


def _attack_names(config: AuditConfig) -> list[str]:
    names = [name.removeprefix("text:") for name in config.attacks] or list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise OptionError(f"--attack {unknown[0]}: text audits run text:hotflip and text:charbug")
    return list(dict.fromkeys(names))


def run_text_audit(config: AuditConfig) -> tuple[AuditReport, list[dict[str, Any]]]:
    started = time.perf_counter()
    options = coerce(TextAuditOptions, dict(config.options), owner="text audit")
    budgets = parse_budgets(config.eps)
    text = load_text_data(config.data, limit=config.limit)
    loaded, warned = load_quietly(config.model, config.load)
    model = as_classifier(loaded, config.model)
    data = encode_data(model, text)
    y = data.y
    output_check = check_model_output(model, data.x, text.num_classes)
    allowed, words = None, None
    if options.substitutions:
        allowed, words = allowed_matrix(load_substitutions(options.substitutions), model.tokenizer.get_vocab(),
                                        model.embedding.num_embeddings)
    threat = TextThreat(budgets, tuple(options.char_ops.split(",")), options.substitutions or None)
    clean_logits = predict_logits(model, data.x)
    clean_correct = clean_logits.argmax(1).cpu() == y
    chance = checks.clean_accuracy_vs_chance(clean_correct, output_check.num_classes,
                                             "that the model is trained (robustkit harden), the label column, --data")
    names = _attack_names(config) if chance.status != "fail" else []
    attacks: dict[str, Any] = {
        "hotflip": HotFlip(beam=options.beam, candidates=options.candidates, allowed=allowed),
        "charbug": CharBug(char_ops=options.char_ops, seed=config.seed),
    }
    # every attack's outcome from the start, as robustkit's engine makes them: one not run yet has
    # no eps done, so a partial report's worst case covers only what every attack finished
    unbroken = torch.where(clean_correct, torch.tensor(NEVER), torch.tensor(0.0))
    outcomes = [AttackOutcome(f"text:{n}", _params(attacks[n]), unbroken.clone()) for n in names]
    carriers = [ThreatModel(Norm.L1, float(k)) for k in budgets]  # an edit count carried where eps goes
    evaluation = Evaluation(carriers, clean_correct, outcomes, config.mode == "cascade",
                            certification="off (no certificates for text)")
    suite = SuiteRecord("text", "discrete text attacks: token substitution and character edits", "",
                        tuple(SuiteAttackRecord(f"text:{n}", _params(attacks[n])) for n in names),
                        {"threat_model": threat.describe(words)})

    def report(evaluation: Evaluation, found: Sequence[checks.Check], sections: Sequence[Section] = ()) -> AuditReport:
        return assemble_report(config, loaded, evaluation, found, started, norm="edits", bounds=(0.0, 1.0),
                               data={**data.describe(), **text.describe()}, suite=suite,
                               attacks={f"text:{n}": attacks[n].needs_gradients for n in names}, notes=warned,
                               sections=sections)

    writes = config.out if init_distributed(config.load.device).is_main else None  # rank 0 writes, as robustkit's
    examples = _attack(config, model, data.x, y, text.texts, evaluation, {n: attacks[n] for n in names},
                       partial_saver(writes, lambda so_far: report(so_far, [])))
    evaluation, found = sanity_checks(config, evaluation, lambda: _checks(config, model, data.x, y, evaluation,
                                                                           budgets, attacks, allowed, output_check))
    try:
        diagnostic = [] if evaluation.interrupted else _diagnostic(model, data.x, y, clean_correct, options)
    except KeyboardInterrupt:  # the attacks' results stand; the report goes without the diagnostic
        evaluation, diagnostic = dataclasses.replace(evaluation, interrupted=True), []
    return (report(evaluation, [chance, *found], _sections(threat, words, examples, diagnostic)),
            per_sample_rows(data, evaluation))


def _attack(config: AuditConfig, model: TextClassifier, ids: Tensor, y: Tensor, texts: Sequence[str],
            evaluation: Evaluation, attacks: dict[str, Any], save_partial: Callable[[Evaluation], None]
            ) -> dict[str, list[tuple[str, str | None, int]]]:
    """Run ``attacks`` in order into ``evaluation``'s outcomes, saving the partial report after
    each; a Ctrl-C stops them and marks ``evaluation`` interrupted. Returns a few examples of each."""
    budgets = [int(k) for k in evaluation.eps]
    top = max(budgets)
    cascade = config.mode == "cascade"
    examples = {}
    try:
        for position, (name, attack) in enumerate(attacks.items()):
            # cascade: only the edits below what earlier attacks needed; per-attack: the full budget
            own = ((evaluation.worst_broken_at().clamp(max=top + 1) - 1).clamp(min=0).long() if cascade
                   else evaluation.clean_correct.long() * top)
            result = _run(name, attack, model, ids, y, texts, own)
            broken_at, rejected = _validated(name, model, ids, texts, y, result)
            broken_at = torch.where(evaluation.clean_correct, broken_at, torch.tensor(0.0))
            outcome = evaluation.outcomes[position]
            evaluation.outcomes[position] = dataclasses.replace(
                outcome, broken_at=broken_at.float(), rejected=rejected,
                seconds={float(k): result.seconds / len(budgets) for k in budgets},
                attacked={float(k): int((own >= k).sum()) for k in budgets})
            examples[name] = [(texts[i], result.adversarial[i], int(broken_at[i]))
                              for i in range(len(texts)) if 0 < broken_at[i] < NEVER][:3]
            save_partial(evaluation)
    except KeyboardInterrupt:  # what finished stands; the report says the audit was interrupted
        evaluation.interrupted = True
    return examples


def _params(attack: Any) -> dict[str, Any]:
    return dataclasses.asdict(attack.params)


def _run(name: str, attack: Any, model: TextClassifier, ids: Tensor, y: Tensor, texts: Sequence[str],
         budgets: Tensor) -> TextAttackResult:
    if name == "charbug":
        return attack.run(model.classify, texts, y, budgets)
    return attack.run(model, ids, y, budgets)


def _validated(name: str, model: TextClassifier, ids: Tensor, texts: Sequence[str], y: Tensor,
               result: TextAttackResult) -> tuple[Tensor, int]:
    """``broken_at`` with every claimed success checked from the text itself: still misclassified
    when re-tokenised, and within the edits claimed. Returns it and the number rejected."""
    broken_at = result.broken_at.clone()
    claimed = [i for i, text in enumerate(result.adversarial) if text is not None and broken_at[i] < NEVER]
    if not claimed:
        return broken_at, 0
    adversarial = [str(result.adversarial[i]) for i in claimed]
    wrong = model.classify(adversarial).argmax(1) != y[claimed]
    if name == "charbug":
        edits = torch.tensor([osa_distance(texts[i], a) for i, a in zip(claimed, adversarial)])
    else:
        edits = token_edits(ids[claimed], model.encode(adversarial, length=ids.shape[1]))
    ok = wrong & (edits <= broken_at[claimed])
    index = torch.tensor(claimed)
    broken_at[index[~ok]] = NEVER
    return broken_at, int((~ok).sum())


def _checks(config: AuditConfig, model: TextClassifier, ids: Tensor, y: Tensor, evaluation: Evaluation,
            budgets: tuple[int, ...], attacks: dict[str, Any], allowed: Tensor | None,
            output_check: Any) -> list[checks.Check]:
    x_sub, y_sub = checks.clean_subset(model, ids, y, config.check_samples, config.seed)
    worst = [row.to_json_dict() for row in worst_case_rows("edits", evaluation)]
    found = [checks.determinism(model, ids), checks.outputs(output_check), _gradients(model, x_sub, y_sub),
             checks.validity(evaluation), checks.confidence(evaluation, worst)]
    if len(x_sub) and "text:hotflip" in [o.name for o in evaluation.outcomes]:
        hotflip = attacks["hotflip"]
        found += [_black_box_vs_white_box(model, x_sub, y_sub, hotflip, allowed, max(budgets), config.seed),
                  _monotone(model, x_sub, y_sub, hotflip, budgets)]
    return found


def _gradients(model: TextClassifier, ids: Tensor, y: Tensor) -> checks.Check:
    """The embedding gradient HotFlip follows must be finite and not zero."""
    from robustkit_text.embedding import zeros
    from robustkit_text.model import perturbed

    if not len(ids):
        return checks.Check("gradients", "untested", "no clean-correct sample to take gradients at")
    delta = zeros(model, ids).requires_grad_(True)
    with perturbed(model.embedding, delta):
        loss = torch.nn.functional.cross_entropy(model(ids), y)
    (grad,) = torch.autograd.grad(loss, delta)
    norms = grad.flatten(1).norm(dim=1)
    if not bool(torch.isfinite(grad).all()):
        return checks.Check("gradients", "fail", "non-finite embedding gradients: HotFlip's ranking is meaningless")
    zero = int((norms == 0).sum())
    detail = f"embedding gradients of {len(ids)} samples: {zero} zero, median norm {float(norms.median()):.2e}"
    return checks.Check("gradients", "fail" if zero > len(ids) // 2 else "pass", detail)


def _black_box_vs_white_box(model: TextClassifier, ids: Tensor, y: Tensor, hotflip: HotFlip,
                            allowed: Tensor | None, k: int, seed: int) -> checks.Check:
    """Random substitutions (black-box, the same edits) must not beat HotFlip (white-box)."""
    budgets = torch.full((len(ids),), k)
    white = hotflip.run(model, ids, y, budgets).broken_at
    free = RandomSubstitution(seed=seed, allowed=allowed).run(model, ids, y, budgets).broken_at
    beaten = int((free < white).sum())
    detail = (f"at k <= {k} on {len(ids)} samples: random substitution broke {int((free < NEVER).sum())}, "
              f"HotFlip {int((white < NEVER).sum())}; random needed fewer edits on {beaten}")
    if not bool((white < NEVER).any()) and not bool((free < NEVER).any()):
        return checks.Check("black-box <= white-box", "untested", detail + ": neither broke a sample")
    status: checks.Status = "pass" if beaten <= 0.03 * len(ids) else ("fail" if beaten > 0.10 * len(ids) else "warn")
    return checks.Check("black-box <= white-box", status, detail + ("" if status == "pass" else
                        ": HotFlip's gradients mislead it (masked or saturated embeddings?)"))


def _monotone(model: TextClassifier, ids: Tensor, y: Tensor, hotflip: HotFlip, budgets: tuple[int, ...]
              ) -> checks.Check:
    """Independent HotFlip runs at each k: robust accuracy must not rise with k."""
    accs = [float((hotflip.run(model, ids, y, torch.full((len(ids),), k)).broken_at > k).float().mean())
            for k in budgets]
    listing = ", ".join(f"k={k}: {a:.1%}" for k, a in zip(budgets, accs))
    if len(budgets) < 2 or len(set(accs)) == 1:
        return checks.Check("monotone in k", "untested", f"flat or a single budget ({listing})")
    rises = any(b > a + 1e-9 for a, b in itertools.pairwise(accs))
    return checks.Check("monotone in k", "fail" if rises else "pass",
                        f"text:hotflip run independently per k: {listing}")


def _diagnostic(model: TextClassifier, ids: Tensor, y: Tensor, clean_correct: Tensor,
                options: TextAuditOptions) -> list[tuple[float, float]]:
    """(radius, accuracy) under embedding-space PGD: a training-time diagnostic, not a threat model."""
    radii = [float(r) for r in options.embedding_eps.split(",") if r.strip()]
    unit = token_norm(model, ids)
    found = []
    for radius in radii:
        standing = 0
        for start in range(0, len(ids), 256):
            xb, yb = ids[start : start + 256], y[start : start + 256]
            delta = pgd(model, xb, yb, radius * unit, options.embedding_steps)
            from robustkit_text.model import perturbed

            with torch.no_grad(), perturbed(model.embedding, delta):
                standing += int(((margins(model(xb), yb) > 0) & clean_correct[start : start + 256]).sum())
        found.append((radius, standing / len(ids)))
    return found


def _sections(threat: TextThreat, words: int | None, examples: dict[str, list[tuple[str, str | None, int]]],
              diagnostic: list[tuple[float, float]]) -> tuple[Section, ...]:
    described = threat.describe(words)
    lines = [f"- **{key.replace('_', ' ')}**: {value}" for key, value in described.items()]
    lines.append("- robust accuracy at k is the share of texts no attack broke with k edits or fewer; bounds do "
                 "not apply to text")
    sections = [Section("Text threat model", "\n".join(lines), PLUGIN)]
    shown = [f"- `{name}`, {k} edit(s): \"{a}\" -> \"{b}\"" for name, rows in examples.items() for a, b, k in rows]
    if shown:
        sections.append(Section("Adversarial examples", "\n".join(shown), PLUGIN))
    if diagnostic:
        table = ["| embedding radius (Frobenius, x mean token norm) | accuracy |", "|---|---|"]
        table += [f"| {r:g} | {100 * a:.1f}% |" for r, a in diagnostic]
        sections.append(Section(
            "Embedding-space PGD (training-time diagnostic)",
            "Not a threat model: no input text realises an arbitrary point of the embedding space. It shows how "
            "far the embedding-space training objective (FGM, PGD, FreeLB) holds.\n\n" + "\n".join(table), PLUGIN))
    return tuple(sections)

