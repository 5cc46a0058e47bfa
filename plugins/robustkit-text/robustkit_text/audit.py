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
from robustkit.errors import OptionError, UnknownNameError
from robustkit.models.loading import check_model_output
from robustkit.modules import predict_logits
from robustkit.params import coerce, param
from robustkit.threat import Norm, ThreatModel
from robustkit_text.attacks import (
    CharBug,
    HotFlip,
    RandomSubstitution,
    SubstitutionSearch,
    TextAttackResult,
    margins,
    run_attack,
    text_attacks,
)
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
    parse_char_ops,
    token_edits,
)

#: The default set, in cascade order (``text_attacks``): text:swap, exact at k = 1, last and costliest.
ATTACKS = {"hotflip": HotFlip, "charbug": CharBug, "swap": SubstitutionSearch}
PLUGIN = "text"


@dataclass(frozen=True)
class TextAuditOptions:
    """``-o KEY VALUE`` of a text audit."""

    substitutions: str = param("", "JSON of word -> allowed replacements for token substitutions ('' any token)")
    beam: int = param(3, "beam width of HotFlip and of the exact search (text:swap)")
    pool: int = param(20_000, "text:swap: most single substitutions of a text scored exactly per depth (above it "
                              "the search is not exhaustive, and the report says so)")
    candidates: int = param(8, "HotFlip's exactly scored flips per beam")
    char_ops: str = param("swap,delete,insert,substitute", "the character attack's operations")
    embedding_eps: str = param("0.25,0.5,1", "radii of the embedding-space PGD diagnostic, in units of the mean "
                                             "token norm like the defences' --eps ('' skips it)")
    embedding_steps: int = param(10, "steps of the embedding-space PGD diagnostic")

    def __post_init__(self) -> None:  # a ValueError here is coerce's ParamsError: exit 2
        radii = [part.strip() for part in self.embedding_eps.split(",") if part.strip()]
        for radius in radii:
            try:
                value = float(radius)
            except ValueError:
                value = float("nan")
            if not 0 < value < float("inf"):
                raise ValueError(f"embedding_eps {self.embedding_eps!r}: give radii > 0 separated by commas, e.g. "
                                 "0.25,0.5,1 ('' skips the diagnostic)")
        if self.embedding_steps < 1:
            raise ValueError(f"embedding_steps {self.embedding_steps}: give a whole number of steps >= 1")
        if self.beam < 1 or self.candidates < 1:
            raise ValueError("beam and candidates must be >= 1")
        parse_char_ops(self.char_ops)


#: What a text audit supports of the flags that image audits take, said when one is given.
TEXT_SUPPORTS = (f"text audits run {', '.join(f'text:{n}' for n in ATTACKS)} (chosen with --attack; the "
                 "scores-only ones need no gradients) at edit budgets --eps 1,2,3, in fp32")


def _refuse_image_settings(config: AuditConfig) -> None:
    """An image-audit flag that a text audit would otherwise ignore: refused (exit 2), saying what
    text audits support."""
    given = {"--black-box": config.black_box, f"--suite {config.suite}": config.suite != "default",
             f"--threat {config.norm.value}": config.norm is not Norm.LINF,
             f"--precision {config.precision}": config.precision != "fp32"}
    refused = [flag for flag, value in given.items() if value]
    if refused:
        raise OptionError(f"{refused[0]} does not apply to a text audit; {TEXT_SUPPORTS}")


def _attack_names(config: AuditConfig) -> list[str]:
    names = [name.strip().lower().removeprefix("text:") for name in config.attacks] or list(ATTACKS)
    unknown = [config.attacks[names.index(n)] for n in names if n not in ATTACKS]
    if unknown:  # as robustkit's registry: an unknown name is exit 1 (it may be a plugin not installed)
        raise UnknownNameError(f"unknown attack {unknown[0]!r} for text; text audits run "
                               f"{', '.join(f'text:{n}' for n in ATTACKS)}")
    return list(dict.fromkeys(names))


def run_text_audit(config: AuditConfig) -> tuple[AuditReport, list[dict[str, Any]]]:
    started = time.perf_counter()
    _refuse_image_settings(config)
    options = coerce(TextAuditOptions, dict(config.options), owner="text audit")
    budgets = parse_budgets(config.eps)
    _attack_names(config)  # an unknown name before the model is loaded
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
    attacks: dict[str, Any] = text_attacks(allowed, beam=options.beam, candidates=options.candidates,
                                           pool=options.pool, char_ops=options.char_ops, seed=config.seed)
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
            result = run_attack(attack, model, ids, y, texts, own)
            broken_at, rejected = _validated(name, model, ids, texts, y, result)
            broken_at = torch.where(evaluation.clean_correct, broken_at, torch.tensor(0.0))
            outcome = evaluation.outcomes[position]
            evaluation.outcomes[position] = dataclasses.replace(
                outcome, broken_at=broken_at.float(), rejected=rejected,
                seconds={float(k): result.seconds / len(budgets) for k in budgets}, notes=list(result.notes),
                attacked={float(k): int((own >= k).sum()) for k in budgets})
            examples[name] = [(texts[i], result.adversarial[i], int(broken_at[i]))
                              for i in range(len(texts)) if 0 < broken_at[i] < NEVER][:3]
            save_partial(evaluation)
    except KeyboardInterrupt:  # what finished stands; the report says the audit was interrupted
        evaluation.interrupted = True
    return examples


def _params(attack: Any) -> dict[str, Any]:
    return dataclasses.asdict(attack.params)


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
    rows = checks.subset_rows(evaluation.clean_correct, config.check_samples, config.seed)
    x_sub, y_sub = ids[rows], y[rows]
    worst = [row.to_json_dict() for row in worst_case_rows("edits", evaluation)]
    found = [checks.determinism(model, ids), checks.outputs(output_check), _gradients(model, x_sub, y_sub),
             checks.validity(evaluation), checks.confidence(evaluation, worst)]
    names = [o.name for o in evaluation.outcomes]
    if len(x_sub) and {"text:hotflip", "text:swap"} & set(names):
        found.append(_black_box_vs_white_box(model, ids, y, rows, evaluation, attacks, allowed, max(budgets),
                                             config.seed))
    if len(x_sub) and "text:hotflip" in names:
        found.append(_monotone(model, x_sub, y_sub, attacks["hotflip"], budgets))
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


#: Texts the check re-searches exactly at k = 1 when text:swap is not in the suite or was capped.
EXACT_CHECK_SAMPLES = 32
#: Random texts drawn per budget by the check's random substitutions.
RANDOM_CHECK_TRIES = 64


def _black_box_vs_white_box(model: TextClassifier, ids: Tensor, y: Tensor, rows: Tensor, evaluation: Evaluation,
                            attacks: dict[str, Any], allowed: Tensor | None, k: int, seed: int) -> checks.Check:
    """No other search may break a text with fewer edits than the audit's worst case credits.

    On the check subset (``rows``), random substitutions (black-box, ``RANDOM_CHECK_TRIES`` per
    budget) and, where the suite's exact search did not settle k = 1 (text:swap not run, or its
    pool capped), text:swap at k = 1 on up to ``EXACT_CHECK_SAMPLES`` texts, are compared with
    the worst case per text: each text they break below it is a known overstatement of the
    reported robust accuracy (fail above 3% of the subset, else warn). Then HotFlip (white-box)
    against text:swap (scores only, exact at k = 1) in the audit itself: a first-order ranking
    that misses more than 5% of the texts the exact search breaks is a warning about HotFlip,
    while the worst case, which includes the exact search, stands."""
    outcomes = {o.name: o for o in evaluation.outcomes}
    worst = evaluation.worst_broken_at()[rows]
    budgets = torch.full((len(rows),), k)
    found: dict[str, Tensor] = {}
    random = RandomSubstitution(tries=RANDOM_CHECK_TRIES, seed=seed, allowed=allowed)
    found["random substitution"] = _validated("random", model, ids[rows], [], y[rows],
                                              random.run(model, ids[rows], y[rows], budgets))[0]
    swap = attacks["swap"]
    exact = "text:swap" in outcomes and 1 in evaluation.eps and not swap.capped
    if not exact:
        few = torch.arange(min(len(rows), EXACT_CHECK_SAMPLES))
        again = SubstitutionSearch(beam=swap.params.beam, pool=swap.params.pool, seed=seed, allowed=allowed)
        result = again.run(model, ids[rows[few]], y[rows[few]], torch.ones(len(few), dtype=torch.long))
        broken = torch.full((len(rows),), NEVER)
        broken[few] = _validated("swap", model, ids[rows[few]], [], y[rows[few]], result)[0]
        found[f"text:swap at k = 1 on {len(few)} of them" + (" (capped pool)" if again.capped else "")] = broken
    below = {name: (broken < worst) & (broken <= k) for name, broken in found.items()}
    over = int(torch.stack(list(below.values())).any(0).sum())
    parts = [f"{name} broke {int((broken <= k).sum())} with fewer edits than the worst case on "
             f"{int(below[name].sum())}" for name, broken in found.items()]
    detail = f"at k <= {k} on {len(rows)} clean texts: " + "; ".join(parts)
    status: checks.Status = "pass" if over == 0 else ("fail" if over > 0.03 * len(rows) else "warn")
    if over:
        detail += (f": the reported robust accuracy is overstated on {over} of them (a stronger search is missing "
                   "from the suite: run text:swap, raise -o pool)")
    if "text:hotflip" in outcomes and "text:swap" in outcomes:
        hot, exhaustive = outcomes["text:hotflip"].broken_at, outcomes["text:swap"].broken_at
        missed = (exhaustive < hot) & (exhaustive <= k) & evaluation.clean_correct
        at_one = int((missed & (exhaustive <= 1)).sum())
        share = int(missed.sum()) / max(1, int(evaluation.clean_correct.sum()))
        detail += (f". In the audit text:swap (scores only, exhaustive at k = 1) broke {int(missed.sum())} texts "
                   f"with fewer edits than text:hotflip found ({at_one} at k = 1)")
        if share > 0.05:
            detail += (f": HotFlip's first-order ranking misses {share:.0%} of the clean texts, so HotFlip alone "
                       "overstates robustness (masked, saturated or flat embeddings?); the worst case includes "
                       "text:swap and stands")
            status = "warn" if status == "pass" else status
    return checks.Check("black-box <= white-box", status, detail)


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

