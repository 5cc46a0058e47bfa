"""``robustkit audit``: a robustness report that a careful reviewer would sign.

Loads the model and data safely, picks the attack suite (``robustkit.audit.suites``; the
default: FGSM, APGD-CE, APGD-T with the DLR loss, FMN and Square), runs the evaluation engine,
runs the sanity checks and writes the report. Partial results are written after every
(attack, eps), so Ctrl-C leaves a valid report marked incomplete, and a failure one that also
says which error stopped it.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from robustkit.attacks.base import Attack
from robustkit.audit import checks
from robustkit.audit.engine import NEVER, Evaluation, NamedAttack, evaluate
from robustkit.audit.pictures import attack_pictures, example_keeper
from robustkit.audit.report import (
    AuditReport,
    Certification,
    ReportConfig,
    ResultRow,
    Section,
    SuiteAttackRecord,
    SuiteRecord,
    Threat,
    WorstCaseRow,
    accuracy_ci,
    write_report,
)
from robustkit.audit.suites import Suite, SuiteChange, get_suite
from robustkit.data import Dataset, load_dataset
from robustkit.distributed import DistContext, distributed_session
from robustkit.environment import environment
from robustkit.errors import OptionError, ParamsError, RobustkitError, one_line
from robustkit.io import folder_lock
from robustkit.models.base import LoadedModel, LoadOptions
from robustkit.models.loading import check_model_output, load_model
from robustkit.modules import predict_logits, seeded
from robustkit.params import coerce
from robustkit.plugin.hookspecs import ReportSection
from robustkit.plugin.host import get_host
from robustkit.plugin.registry import Entry
from robustkit.threat import Norm, ThreatModel, default_eps, parse_number

log = logging.getLogger(__name__)

Mode = Literal["cascade", "per-attack"]


@dataclass(frozen=True)
class AuditConfig:
    model: str
    data: str = "builtin:digits"
    load: LoadOptions = field(default_factory=LoadOptions)
    attacks: tuple[str, ...] = ()  #: named attacks replace the suite
    suite: str = "default"  #: a name of robustkit.audit.suites.SUITES
    options: tuple[tuple[str, str], ...] = ()  #: -o KEY VALUE, or -o ATTACK.KEY VALUE
    norm: Norm = Norm.LINF
    eps: tuple[float, ...] = ()
    limit: int | None = None
    batch_size: int = 256
    seed: int = 0
    precision: str = "fp32"
    mode: Mode = "cascade"
    check_samples: int = 128
    run_checks: bool = True
    black_box: bool = False  #: attack through scores only (an ONNX model: onnxruntime, no conversion)
    certify: bool = True  #: prove samples robust by bound propagation and skip them (robustkit.audit.certify)
    out: Path | None = None


def parse_eps_list(text: str) -> tuple[float, ...]:
    """``"2/255,4/255,0.1"`` -> floats; each must be >= 0."""
    values = tuple(parse_number(part) for part in text.split(",") if part.strip())
    if not values:
        raise OptionError("--eps needs at least one value, e.g. --eps 2/255,8/255")
    for value in values:
        if value < 0:
            raise OptionError(f"eps must be >= 0, got {value:g}")
    return values


def _split_options(options: Sequence[tuple[str, str]], names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Route ``-o KEY VALUE`` to every attack that has KEY, ``-o NAME.KEY VALUE`` to one."""
    routed: dict[str, dict[str, str]] = {name: {} for name in names}
    registry = get_host().attacks
    for key, value in options:
        target, dot, bare = key.rpartition(".")
        if dot:
            qualified = registry.resolve(target).qualified_name
            if qualified not in routed:
                raise ParamsError(f"-o {key}: {qualified} is not in this audit's attacks ({', '.join(names)})")
            routed[qualified][bare] = value
            continue
        takers = [n for n in names if bare.replace("-", "_") in _fields(registry.resolve(n).obj)]
        if not takers:
            known = sorted({f for n in names for f in _fields(registry.resolve(n).obj)})
            close = difflib.get_close_matches(bare.replace("-", "_"), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ParamsError(
                f"-o {key}: no attack in this audit has that parameter; {hint}valid keys: {', '.join(known)}"
            )
        for name in takers:
            routed[name][bare] = value
    return routed


def _fields(attack_cls: type[Attack]) -> set[str]:
    return set(getattr(attack_cls.Params, "__dataclass_fields__", {}))


def build_suite(config: AuditConfig, white_box: bool) -> list[NamedAttack]:
    """``plan_suite``'s attacks."""
    return plan_suite(config, white_box)[0]


def plan_suite(config: AuditConfig, white_box: bool) -> tuple[list[NamedAttack], str | None]:
    """Resolve the attacks (``--attack``, else the named suite), apply options, and order them
    cheapest first (gradient-free last); with ``left_out_note`` for a named suite."""
    registry = get_host().attacks
    entries: list[tuple[Entry[Any], dict[str, Any]]]
    note = None
    if config.attacks:
        entries = [(registry.resolve(name), {}) for name in config.attacks]
    else:
        spec = get_suite(config.suite)
        entries = [(registry.resolve(a.name), dict(a.settings)) for a in spec.attacks]
        note = left_out_note(spec, [e for e, _ in entries], config.norm)
        entries = [(e, s) for e, s in entries if config.norm in e.obj.norms]
    if not white_box:
        refused = [e.qualified_name for e, _ in entries if e.obj.needs_gradients]
        if config.attacks and refused:
            raise RobustkitError(f"{', '.join(refused)} need gradients, which this model does not give; "
                                 "use a gradient-free attack such as square")
        entries = [(e, s) for e, s in entries if not e.obj.needs_gradients]
    for entry, _ in entries:
        if config.norm not in entry.obj.norms:
            norms = ", ".join(sorted(n.value for n in entry.obj.norms))
            raise RobustkitError(f"{entry.qualified_name} does not support {config.norm.value}; it supports {norms}")
    names = [e.qualified_name for e, _ in entries]
    if len(set(names)) != len(names):
        raise RobustkitError("the same attack is named twice")
    routed = _split_options(config.options, names)
    suite = [NamedAttack(entry.qualified_name, entry.obj(_params(entry, suite_settings, config,
                                                                 routed[entry.qualified_name])))
             for entry, suite_settings in entries]
    # Cheap first; gradient-free attacks last, so they run on what the gradients left standing.
    return sorted(suite, key=lambda a: (not a.attack.needs_gradients, 0 if "fgsm" in a.name else 1)), note


def _params(entry: Entry[Any], settings: Mapping[str, Any], config: AuditConfig,
            options: Mapping[str, str] | None = None) -> Any:
    """``entry``'s Params: ``settings`` (a suite's), the audit's precision and seed where the attack
    takes them, then ``options`` (its ``-o``)."""
    fields = _fields(entry.obj)
    merged = dict(settings)
    for key, value in (("precision", config.precision), ("seed", config.seed)):
        if key in fields:
            merged[key] = value
    merged.update(options or {})
    return coerce(entry.obj.Params, merged, owner=entry.qualified_name)


def _suite_changes(config: AuditConfig, suite: Sequence[NamedAttack]) -> list[SuiteChange]:
    """The parameters of the named suite's attacks that ran (``suite``) with other values than
    the suite's (``-o``); none for --attack, which names no suite to differ from."""
    if config.attacks:
        return []
    ran = {a.name: a.attack.params for a in suite}
    changes = []
    for planned in get_suite(config.suite).attacks:
        entry = get_host().attacks.resolve(planned.name)
        if entry.qualified_name not in ran:
            continue  # left out (another norm, a black-box model): said by left_out_note or the checks
        own = dataclasses.asdict(_params(entry, planned.settings, config))
        used = dataclasses.asdict(ran[entry.qualified_name])
        changes += [SuiteChange(entry.qualified_name, key, value, used[key])
                    for key, value in own.items() if used[key] != value]
    return changes


def left_out_note(spec: Suite, entries: Sequence[Entry[Any]], norm: Norm) -> str | None:
    """What the suite ``spec`` (its attacks resolved as ``entries``) could not run under ``norm``
    (a weaker audit than its name promises: said on the terminal and in the report's notes), or None."""
    left_out = [a.name for a, entry in zip(spec.attacks, entries) if norm not in entry.obj.norms]
    if not left_out:
        return None
    return (f"suite {spec.name}: {', '.join(left_out)} do not support {norm.value} and were not run; "
            f"the worst case is over the others only")


def build_report(config: AuditConfig, loaded: LoadedModel, data: Dataset, evaluation: Evaluation,
                 found_checks: Sequence[checks.Check], suite: list[NamedAttack], started: float,
                 notes: Sequence[str] = ()) -> AuditReport:
    """The image audit's ``assemble_report``, without plugin sections (they are given this
    report to read; ``_run_audit`` adds what they return)."""
    return assemble_report(config, loaded, evaluation, found_checks, started, norm=config.norm.value,
                           bounds=data.bounds, data=data.describe(), suite=_suite_description(config, suite),
                           attacks={a.name: a.attack.needs_gradients for a in suite}, notes=notes)


def assemble_report(config: AuditConfig, loaded: LoadedModel, evaluation: Evaluation,
                    found_checks: Sequence[checks.Check], started: float, *, norm: str, bounds: tuple[float, float],
                    data: Mapping[str, Any], suite: SuiteRecord, attacks: Mapping[str, bool],
                    notes: Sequence[str] = (), sections: Sequence[Section] = ()) -> AuditReport:
    """The report of ``evaluation`` and ``found_checks``, for every kind of audit (image, a
    plugin's text audit), so that their reports cannot drift apart. ``attacks``: the attacks
    of the audit in the order they ran, each with whether it needs gradients; ``norm`` the
    report's name for what eps measures ("edits" for text); ``data`` the data's description."""
    n = evaluation.n
    clean = evaluation.clean_accuracy
    return AuditReport(
        complete=not evaluation.interrupted,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 2),
        n=n,
        clean_accuracy=clean,
        clean_ci95=accuracy_ci(clean, n),
        threat=Threat(norm, tuple(evaluation.eps), bounds, targeted=False),
        mode=config.mode,
        attack_access="white-box (gradients)" if loaded.white_box else "black-box (scores only)",
        results=result_rows(norm, evaluation, list(attacks.values())),
        worst_case=worst_case_rows(norm, evaluation),
        certification=Certification(evaluation.certification, round(sum(evaluation.certify_seconds.values()), 4)),
        checks=tuple(found_checks),
        notes=tuple(notes) + tuple(note for outcome in evaluation.outcomes for note in outcome.notes),
        model=loaded.describe(),
        data={**data, "limit": config.limit},
        environment=environment(config.load.device),
        config=ReportConfig(suite=suite, attacks=tuple(attacks), batch_size=config.batch_size, seed=config.seed,
                            precision=config.precision, check_samples=config.check_samples),
        sections=tuple(sections),
    )


def result_rows(norm: str, evaluation: Evaluation, gradients: Sequence[bool]) -> tuple[ResultRow, ...]:
    """A row per (attack, eps) that was computed (an interruption leaves some out); ``gradients``:
    whether each attack of ``evaluation.outcomes`` needs them."""
    rows = []
    cascade = evaluation.cascade
    for index, (needs_gradients, outcome) in enumerate(zip(gradients, evaluation.outcomes)):
        for eps in evaluation.eps:
            if eps not in outcome.seconds:
                continue  # not reached before an interruption
            if cascade:
                # In a cascade each attack sees only the survivors of the earlier ones, so its
                # figure is the robust accuracy after the attacks up to and including it.
                stacked = torch.stack([o.broken_at for o in evaluation.outcomes[: index + 1]]).min(0).values
                acc = float((stacked > eps).float().mean())
            else:
                acc = evaluation.robust_accuracy(outcome, eps)
            rows.append(ResultRow(attack=outcome.name, norm=norm, eps=eps, robust_accuracy=acc,
                                  ci95=accuracy_ci(acc, evaluation.n), seconds=round(outcome.seconds[eps], 4),
                                  attacked=outcome.attacked[eps], skipped=outcome.skipped.get(eps, 0),
                                  gradients=needs_gradients,
                                  scope="cumulative" if cascade else "single attack", params=outcome.params))
    return tuple(rows)


def worst_case_rows(norm: str, evaluation: Evaluation) -> tuple[WorstCaseRow, ...]:
    """The worst case over the attacks at each eps that every attack completed."""
    completed = [e for e in evaluation.eps if all(e in o.seconds for o in evaluation.outcomes)]
    rows = []
    for eps in completed:
        worst = evaluation.worst_case(eps)
        certified, certified_ci95 = _certified(evaluation, eps)
        rows.append(WorstCaseRow(norm=norm, eps=eps, robust_accuracy=worst,
                                 ci95=accuracy_ci(worst, evaluation.n), certified_accuracy=certified,
                                 certified_ci95=certified_ci95))
    return tuple(rows)


@dataclass
class PartialSaver:
    """An ``on_result`` for an audit that writes to ``out`` (None: it writes nothing): the report
    ``build`` makes of the evaluation so far, marked incomplete, as report.json (one atomic set),
    so that Ctrl-C leaves a valid partial report; ``failed`` rewrites it to say that an error
    stopped the audit, and which, rather than an interruption."""

    out: Path | None
    build: Callable[[Evaluation], AuditReport]
    last: Evaluation | None = None  #: what the engine last reported (it updates it in place)

    def __call__(self, evaluation: Evaluation) -> None:
        self.last = evaluation
        self._write(None)

    def failed(self, err: Exception) -> None:
        failure = one_line(err)
        if self._write(failure):
            log.error("the audit failed (%s); %s holds what it computed, marked so", failure, self.out)

    def _write(self, failure: str | None) -> bool:
        """Write the partial report, unless there is nowhere to or nothing yet; whether it did."""
        if self.out is None or self.last is None:
            return False
        report = self.build(dataclasses.replace(self.last, interrupted=True))
        write_report(dataclasses.replace(report, failure=failure), self.out, render=False)
        return True


#: The partial saver of the audit running in this context, whichever made it (robustkit's image
#: audit, or a plugin's ``robustkit_audit_job``): ``run_audit_report`` tells it of a failure.
_saver: ContextVar[PartialSaver | None] = ContextVar("robustkit_partial_saver", default=None)


def partial_saver(out: Path | None, build: Callable[[Evaluation], AuditReport]) -> PartialSaver:
    """The audit's ``PartialSaver``, which a failure of the audit rewrites (``run_audit_report``)."""
    saver = PartialSaver(out, build)
    _saver.set(saver)
    return saver


def sanity_checks(config: AuditConfig, evaluation: Evaluation,
                  run: Callable[[], list[checks.Check]]) -> tuple[Evaluation, list[checks.Check]]:
    """What ``run`` finds, when the checks are wanted and there are finished attacks to check;
    else why they are missing. A Ctrl-C during them keeps the results, marked interrupted."""
    if not config.run_checks:
        return evaluation, [checks.Check("sanity checks", "untested",
                                         "skipped (--no-checks): gradient masking was not looked for")]
    if evaluation.interrupted or not evaluation.outcomes:
        return evaluation, []
    try:
        return evaluation, run()
    except KeyboardInterrupt:  # the results stand; the report says the checks are missing
        return dataclasses.replace(evaluation, interrupted=True), [checks.Check(
            "sanity checks", "untested", "interrupted (Ctrl-C) before the sanity checks finished: none of them ran "
            "to the end, so gradient masking was not looked for")]


def _suite_description(config: AuditConfig, suite: Sequence[NamedAttack]) -> SuiteRecord:
    """The suite's record: its own settings, and what ``-o`` changed in the attacks that ran."""
    if config.attacks:
        return SuiteRecord("custom", "the attacks named with --attack", "",
                           tuple(SuiteAttackRecord(name, {}) for name in config.attacks),
                           {"gradient_free_shortcut": False})  # the attacks asked for, on every sample
    spec = get_suite(config.suite)
    changes = _suite_changes(config, suite)
    return dataclasses.replace(SuiteRecord.from_mapping(spec.describe()), caveat=spec.caveat_for(changes),
                               modified=tuple(changes))


def _certified(evaluation: Evaluation, eps: float) -> tuple[float | None, tuple[float, float] | None]:
    """The certified accuracy (a proven lower bound) at ``eps`` and its interval; Nones when not computed."""
    certified = evaluation.certified_accuracy(eps)
    if certified is None:
        return None, None
    return certified, accuracy_ci(certified, evaluation.n)


def per_sample_rows(data: Dataset, evaluation: Evaluation) -> list[dict[str, Any]]:
    worst = evaluation.worst_broken_at()
    by = evaluation.breaking_attack()
    proven = evaluation.proven_to()
    return [{"index": i, "label": int(data.y[i]), "clean_correct": bool(evaluation.clean_correct[i]),
             "broken_at_eps": _eps_cell(float(worst[i]), NEVER), "broken_by": by[i] or "",
             "proven_robust_to_eps": _eps_cell(float(proven[i]), 0.0)}
            for i in range(evaluation.n)]


def _eps_cell(value: float, empty: float) -> str | float:
    """An eps for the CSV: blank for ``empty``; else rounded, as eps are stored in float32."""
    return "" if value == empty else float(f"{value:.6g}")


def _pick(suite: list[NamedAttack], predicate: Any, *, first: bool = False) -> NamedAttack | None:
    found = [a for a in suite if predicate(a)]
    return (found[0] if first else found[-1]) if found else None


def _checks_iterative(ran: list[NamedAttack], model: Any, x: Tensor, y: Tensor) -> NamedAttack | None:
    """The iterative attack the checks rerun in other settings: the first eps-bounded one (APGD
    in the suites; a minimum-norm search such as FMN answers other eps only at many times the
    cost), but one whose loss does not saturate (APGD-T's DLR) when the softmax does: a
    cross-entropy attack stands still there and every check rerunning it would test nothing."""
    def bounded(a: NamedAttack) -> bool:
        return a.attack.needs_gradients and not a.name.endswith(":fgsm") and not a.attack.minimum_norm

    first = _pick(ran, bounded, first=True)
    if first is None or not first.attack.follows_cross_entropy() or not checks.softmax_saturates(model, x, y):
        return first
    return _pick(ran, lambda a: bounded(a) and not a.attack.follows_cross_entropy(), first=True) or first


def run_checks(config: AuditConfig, model: Any, data: Dataset, evaluation: Evaluation, suite: list[NamedAttack],
               output_check: Any, worst: list[dict[str, Any]], num_classes: int,
               reload: Callable[[], Any] | None = None) -> list[checks.Check]:
    """The sanity checks; ``reload`` loads the model afresh (None: it holds no state, an ONNX graph)."""
    rows = checks.subset_rows(evaluation.clean_correct, config.check_samples, config.seed)  # no second clean pass
    x_sub, y_sub = data.x[rows], data.y[rows]
    ran = checks.attacks_that_ran(suite, evaluation)  # a failed attack would fail again in a check
    eps = sorted(evaluation.eps)
    # Checks that compare attacks run where samples break: at an eps where nothing breaks
    # (or everything does) they compare nothing and would pass.
    informative = checks.informative_eps(evaluation)
    middle = informative if informative is not None else (eps[len(eps) // 2] if eps else 0.0)
    fgsm = _pick(ran, lambda a: a.attack.needs_gradients and a.name.endswith(":fgsm"))
    iterative = _checks_iterative(ran, model, x_sub, y_sub)
    free = _pick(ran, lambda a: not a.attack.needs_gradients)
    inputs = checks.CheckInputs(model, x_sub, y_sub, ThreatModel(config.norm, middle, data.bounds), eps,
                                fgsm, iterative, free, num_classes, config.batch_size, ran)
    found = [checks.determinism(model, data.x),
             checks.stateless(model, reload() if reload is not None else None, x_sub,
                              [ThreatModel(config.norm, e, data.bounds) for e in eps], config.seed),
             checks.outputs(output_check), checks.scores_vary(model, x_sub),
             checks.gradients(model, x_sub, y_sub, ran), checks.validity(evaluation),
             _attack_rerun("certificates hold", lambda _: checks.certificates_hold(
                 model, data.x, data.y, evaluation, (iterative, free), config.check_samples, config.batch_size),
                 inputs),
             checks.gradient_free_vs_white_box(evaluation, {a.name for a in suite if not a.attack.needs_gradients}),
             checks.confidence(evaluation, worst)]
    if len(x_sub):
        found += [_attack_rerun(name, check, inputs) for name, check in RERUNNING_CHECKS]
    return found


#: The checks that rerun the suite's attacks in other settings (eps 0.5, twice the steps).
RERUNNING_CHECKS: tuple[tuple[str, Callable[[checks.CheckInputs], checks.Check]], ...] = (
    ("iterative >= fgsm", checks.iterative_vs_fgsm), ("monotone in eps", checks.monotone_in_eps),
    ("large-eps probe", checks.large_eps_probe), ("convergence", checks.convergence))


def _attack_rerun(name: str, check: Callable[[checks.CheckInputs], checks.Check],
                  inputs: checks.CheckInputs) -> checks.Check:
    """``check(inputs)``; an attack that raises in the check's settings (it ran in the audit's)
    fails that check, not the audit, whose figures stand (checks run on rank 0 alone)."""
    try:
        return check(inputs)
    except Exception as err:
        log.error("check %r could not run (%s); it is marked failed", name, one_line(err))
        return checks.Check(name, "fail", f"the check could not run: {one_line(err)}; an attack that fails in "
                            "other settings than the audit's may also misbehave in them")


def run_audit(config: AuditConfig) -> dict[str, Any]:
    """Run the audit and return the report document (``report.json``; also written to ``config.out``).

    Under torchrun every rank returns only after rank 0 has written the report, with the
    process group ended (``distributed_session``).
    """
    return run_audit_report(config).to_json_dict()


def run_audit_report(config: AuditConfig) -> AuditReport:
    """``run_audit``, returning the typed report."""
    with distributed_session(config.load.device) as dist_ctx, seeded(config.seed, config.load.device):
        if config.out is None or not dist_ctx.is_main:
            return _run_audit(config, dist_ctx)
        with folder_lock(config.out, "robustkit audit"):
            return _failure_reported(config, dist_ctx)


def _failure_reported(config: AuditConfig, dist_ctx: DistContext) -> AuditReport:
    """``_run_audit``; should it fail, its partial report says so, and why, before the error goes on
    (an interruption is no error: the engine and the checks catch it and the report says so)."""
    token = _saver.set(None)
    try:
        return _run_audit(config, dist_ctx)
    except Exception as err:
        saver = _saver.get()
        if saver is not None:
            saver.failed(err)
        raise
    finally:
        _saver.reset(token)


def _with_sections(report: AuditReport, started: float) -> AuditReport:
    """``report`` with the plugins' sections after its own; they read the document (a copy:
    what they change stays theirs)."""
    sections = report.sections + tuple(
        Section(s.title, s.markdown, plugin)
        for plugin, returned in get_host().collect("robustkit_report_sections", report=report.to_json_dict())
        for s in (returned or []) if isinstance(s, ReportSection)
    )
    return dataclasses.replace(report, sections=sections, seconds=round(time.perf_counter() - started, 2))


def _run_audit(config: AuditConfig, dist_ctx: DistContext) -> AuditReport:
    started = time.perf_counter()
    job = get_host().first_result("robustkit_audit_job", config=config)
    if job is not None:  # a plugin's audit (text, ...): the sections and files are robustkit's, as below
        report, per_sample = job
        report = _with_sections(report, started)
        if config.out is not None and dist_ctx.is_main:
            write_report(report, config.out, per_sample)
        return report
    loaded = load_model(config.model, config.load)
    data = load_dataset(config.data, limit=config.limit)  # only what --limit needs is read
    if config.limit is not None:
        if config.limit < 1:
            raise RobustkitError(f"--limit must be >= 1, got {config.limit}")
        data.x, data.y = data.x[: config.limit], data.y[: config.limit]
    if loaded.format == "onnx":
        from robustkit.models.onnx import choose_access

        choose_access(loaded, data.x, device=config.load.device, black_box=config.black_box)
    elif config.black_box and loaded.white_box:
        module = loaded.model
        loaded.model = lambda x: predict_logits(module, x).to(x.device)
        loaded.notes.append("attacked black-box (scores only), as requested")
    output_check = check_model_output(loaded.model, data.x, data.num_classes)
    data.validate(output_check.num_classes)
    eps_list = config.eps or default_eps(config.norm, data.bounds)
    threats = [ThreatModel(config.norm, e, data.bounds) for e in eps_list]
    suite, left_out = plan_suite(config, loaded.white_box)
    if left_out is not None:
        log.warning("%s", left_out)
    notes = [left_out] if left_out is not None else []
    if not suite:
        raise RobustkitError("no attack in the suite can attack this model; name one with --attack")
    writes_files = config.out is not None and dist_ctx.is_main
    save_partial = partial_saver(config.out if writes_files else None,
                                 lambda so_far: build_report(config, loaded, data, so_far, [], suite, started, notes))

    # a named suite may take the gradient-free shortcut (it says so); --attack lists run in full
    shortcut = not config.attacks and get_suite(config.suite).gradient_free_shortcut
    clean_logits = predict_logits(loaded.model, data.x)  # once: the chance check and the engine share them
    clean_correct = clean_logits.argmax(1).cpu() == data.y.cpu()
    chance = checks.clean_accuracy_vs_chance(clean_correct, output_check.num_classes)
    keeper = example_keeper(data.x) if writes_files else None  # the report's pictures; None: not images
    if chance.status == "fail":  # nothing an attack could measure; said on the terminal and in the report
        log.error("%s", chance.detail)
        evaluation = Evaluation([], clean_correct, [], config.mode == "cascade")
    else:
        evaluation = evaluate(loaded.model, data.x, data.y, suite, threats, batch_size=config.batch_size,
                              cascade=config.mode == "cascade", device=config.load.device, on_result=save_partial,
                              dist_ctx=dist_ctx, certify=config.certify, clean_logits=clean_logits,
                              gradient_free_shortcut=shortcut, examples=keeper)
    found = [chance]
    failed = [f"{o.name} ({o.failed})" for o in evaluation.outcomes if o.failed]
    if failed:  # said on the terminal by the engine, here a failed check and a banner
        found.append(checks.Check("attacks completed", "fail",
                                  f"{'; '.join(failed)}: left out after failing, the weights restored; the worst "
                                  "case is over the other attacks only"))

    def checks_found() -> list[checks.Check]:
        if not dist_ctx.is_main:
            return []
        worst = [row.to_json_dict() for row in worst_case_rows(config.norm.value, evaluation)]
        return run_checks(config, loaded.model, data, evaluation, suite, output_check, worst,
                          output_check.num_classes, None if loaded.format == "onnx" else reload)

    def reload() -> Any:
        """The model as the audit loaded it, before any query (fresh weights drawn alike)."""
        with seeded(config.seed, config.load.device):
            return load_model(config.model, config.load).model

    evaluation, more = sanity_checks(config, evaluation, checks_found)
    found += more
    report = build_report(config, loaded, data, evaluation, found, suite, started, notes)
    report = _with_sections(report, started)
    if writes_files:
        assert config.out is not None
        kept = keeper.chosen(evaluation.worst_broken_at()) if keeper is not None else []
        write_report(report, config.out, per_sample_rows(data, evaluation),
                     pictures=attack_pictures(loaded.model, data.x, data.y, kept, data.class_names))
    return report
