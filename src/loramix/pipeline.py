"""The whole job, top-down as the data flows: dataset -> signature -> distances -> coefficients ->
composition -> adapter folder (PEFT files + loramix.json, written atomically)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .adapter import DTYPES
from .arguments import checked
from .bank import Bank
from .compose import COMPOSERS, Composition, plan, write_compositions
from .config import FINETUNE, GenerateConfig
from .refine import finetune, refuse_slow_refine
from .data import Dataset, read_dataset
from .errors import LoramixError
from .files import atomic_dir, refuse_target
from .runtime import base_paths, pytorch
from .index import BankIndex
from .meta import loo_coefficients, operator_for
from .operators import OPERATORS
from .paths import resolve_bank
from .calibrate import cached_calibration
from .check import CHECK_SCALES, check, plan_check
from .report import CalibrationInfo, CheckInfo, CheckPlan, DataInfo, EnergyInfo, RefineInfo, Report
from .signatures import SIGNATURES, SignatureSpec, make_signer
from .version import __version__

log = logging.getLogger("loramix")


@dataclass
class GenerateResult:
    """What `generate` wrote and why: coefficients and distances per usable bank entry, and the report."""

    out: Path
    coefficients: dict[str, float]
    distances: dict[str, float]
    report: Report = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per stage (STAGES) of this call

    def top(self, n: int = 5) -> list[tuple[str, float]]:
        """The n largest coefficients, largest first."""
        return sorted(self.coefficients.items(), key=lambda kv: -kv[1])[:n]


def _configure(config: GenerateConfig | None, overrides: dict[str, Any]) -> GenerateConfig:
    """`config` (default GenerateConfig()) with keyword overrides, validated; an override that is no setting is one
    line naming it."""
    if unknown := sorted(set(overrides) - {f.name for f in fields(GenerateConfig)}):
        raise LoramixError(f"unknown setting(s) {', '.join(unknown)}: GenerateConfig has no such field")
    return replace(config or GenerateConfig(), **overrides)


def _check_bank(index: BankIndex, config: GenerateConfig, spec: SignatureSpec) -> None:
    """Refuse what this bank cannot do with `config` before any signature is computed."""
    bank = index.bank
    if not bank.usable and config.entry_signatures == "data":
        raise LoramixError(f"{bank.path}: no bank entry has training data (train.jsonl), so none can be weighted with "
                           "--entry-signatures data ('auto' signs them by their answers to probe prompts)")
    if config.probes is not None and index.mode(config.entry_signatures) == "data":
        log.warning("--probes %s is not used: every entry is signed by its training data (--entry-signatures %s)",
                    config.probes, config.entry_signatures)
    if index.mode(config.entry_signatures) != "data" and bank.base_model is None:
        raise LoramixError(f"{bank.path}: --entry-signatures {config.entry_signatures} signs entries by their answers to "
                           "probe prompts, which needs the base model, and the bank names none")
    if SIGNATURES.get(spec.method).needs_base and spec.model is None:
        raise LoramixError(f"signature '{spec.method}' needs the base model: the bank names none, pass model=... (--model)")
    operator = OPERATORS.get(config.operator)
    if operator.trainable and len(bank.usable) < operator.min_entries:
        raise LoramixError(f"operator '{config.operator}' needs at least {operator.min_entries} bank entries with data to fit")
    COMPOSERS.get(config.compose)().check(bank.entries)


def _base_for(index: BankIndex, config: GenerateConfig) -> tuple[Any, Any, Any]:
    """(model, tokenizer, engine): the base model when `config` runs it, loaded before any other work so that a base
    that cannot be loaded is reported at once. The check (and the probe answers of entries without data) run on
    `engine` (runtime.llamacpp.LlamaCpp) when the runtime is llama.cpp, else on the PyTorch model, which --refine always
    needs; None where unused (PyTorch probe answers load the base themselves, only when not cached)."""
    from .runtime.pytorch import load_model, load_tokenizer
    from .runtime import choose_runtime, resolve_base

    base = config.base if config.base is not None else index.bank.base_model
    probing = index.mode(config.entry_signatures) != "data"
    if not (config.refine or config.check_examples or (probing and (config.base is not None or config.runtime != "auto"))):
        return None, None, None
    model = tokenizer = engine = None
    try:
        on_llamacpp = choose_runtime(resolve_base(base), config.runtime) == "llama.cpp"
        if on_llamacpp and (config.check_examples or probing):
            from .runtime.llamacpp import open_base

            engine = open_base(base)
        if config.refine or (not on_llamacpp and (config.check_examples or config.base is not None)):
            model, tokenizer = load_model(base), load_tokenizer(base)
    except LoramixError as e:
        if engine is not None:
            engine.close()
        why = "--refine runs the base model" if config.refine else (
            f"the held-out check (--check {config.check_examples}) runs the base model; --check 0 skips it"
            if config.check_examples else "the entries without data answer probe prompts on the base model")
        raise LoramixError(f"{e} ({why})") from None
    return model, tokenizer, engine


def _read_paths(config: GenerateConfig, bank: Path, data: str | Path | None, opened: Bank | None = None) -> dict:
    """What a command composing from `bank` reads, for files.refuse_target: the bank, the data, the base model (--base,
    else, once the bank is `opened`, the bank's), the probe prompts and the --model override."""
    base = config.base if config.base is not None else opened.base_model if opened is not None else None
    return {"the bank": bank, "the data": data, "the probe prompts": config.probes,
            "the base model": base_paths(base) if config.base is not None or opened is not None else None,
            "the model": base_paths(config.model) if config.model is not None else None}


def _refuse_empty_paths(where: str, **paths: Any) -> None:
    """Refuse a path given as an empty string, which Path reads as the current folder."""
    for name, value in paths.items():
        if isinstance(value, str) and not value.strip():
            raise LoramixError(f"{where}(): {name} is an empty path")


@checked
def generate(
    bank: str | Path | Bank,
    data: str | Path | Dataset,
    out: str | Path,
    config: GenerateConfig | None = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    **overrides: Any,
) -> GenerateResult:
    """Compose a new adapter for `data` from `bank` and write it to `out` (a PEFT adapter folder plus
    loramix.json). Settings come from `config`, with keyword overrides (e.g. `top_k=8`). `allow_pickle`: see Bank.
    Every choice is checked against the bank before any signature is computed."""
    config = _configure(config, overrides)
    _refuse_empty_paths("generate", bank=bank, data=data, out=out)
    seconds: dict[str, float] = {}
    stage = partial(_timed, seconds)
    with stage("open"):
        refuse_target(out, force=force, inputs=_read_paths(config, bank.path if isinstance(bank, Bank) else resolve_bank(bank),
                                                           None if isinstance(data, Dataset) else data))
        bank = bank if isinstance(bank, Bank) else Bank(bank, allow_pickle=allow_pickle)
        if config.base is None:  # the bank's base, known once it is open
            refuse_target(out, force=True, inputs={"the base model": base_paths(bank.base_model)})
        dataset = data if isinstance(data, Dataset) else read_dataset(data)
        if not len(dataset):
            raise LoramixError(f"{dataset.source}: the dataset has no samples")
        index = BankIndex(bank)
        weighted = index.weighted(config.entry_signatures)
        spec = index.resolve(config.signature_spec())
        _check_bank(index, config, spec)
    with stage("base model"):
        model, tokenizer, engine = _base_for(index, config)
    with engine if engine is not None else nullcontext():
        return _after_base(bank, dataset, out, config, index, weighted, spec, model, tokenizer, engine, force, stage, seconds)


def _after_base(bank: Bank, dataset: Dataset, out: str | Path, config: GenerateConfig, index: BankIndex, weighted: list,
                spec: SignatureSpec, model: Any, tokenizer: Any, engine: Any, force: bool, stage: Any,
                seconds: dict[str, float]) -> GenerateResult:
    """generate's stages once the base model is loaded (`engine`: the check's llama.cpp runtime, else None)."""

    calibration = cached_calibration(bank, config) if config.calibration else None
    if config.calibration and calibration is None:
        log.warning("--calibration: %s has no calibration for this setting (or its entries changed since): the "
                    "options' own values are used; run `loramix bank calibrate %s`", bank.path, bank.path)
    if calibration is not None:  # the bank's calibrated parameters replace the options they cover
        best = calibration.best
        config = replace(config, temperature=best.temperature, top_k=best.top_k, scale=best.scale)
    with stage("signature"):
        user_sig = make_signer(spec)(dataset)
    with stage("distances"):
        d = index.distance_row(spec, config.distance, user_sig, config.entry_signatures, config.probe_set(), config.seed,
                               model=model, tokenizer=tokenizer, base=engine, base_name=config.base)
    with stage("coefficients"):
        c = operator_for(index, config).coefficients(d, config.temperature, config.top_k)
    coefficients = {e.name: config.scale * float(x) for e, x in zip(weighted, c)}
    refined = checked = None
    refine_samples = dataset.subsample(config.refine, config.seed) if config.refine else None
    if config.refine > len(dataset):
        log.warning("--refine %d: %s has %d examples; all of them are used", config.refine, dataset.source, len(dataset))
    tuning = bool(config.refine) and config.refine_method == FINETUNE  # else a weight search, before the check
    if config.refine:
        refuse_slow_refine(config, refine_samples, model, tokenizer)
    if config.refine and not tuning:
        from .refine import RefineConfig, refine

        rcfg = RefineConfig(examples=config.refine, top_k=config.top_k or 8, method=config.refine_method,
                            steps=config.refine_steps or RefineConfig.steps, budget=config.refine_budget,
                            per_layer=config.refine_per_layer, seed=config.seed)
        with stage("refine"):
            refined = refine(bank, coefficients, refine_samples, rcfg, method=config.compose, model=model, tokenizer=tokenizer)
    weights = refined.coefficients if refined else coefficients
    planned = None
    if config.check_examples:
        used = set(refine_samples.samples) if refine_samples else set()
        held = Dataset([s for s in dataset.samples if s not in used], dataset.source)
        if not held.samples:
            raise LoramixError(f"{dataset.source}: no examples left for --check after --refine {config.refine}: give "
                               "more examples than it uses, or pass --check 0")
        with stage("check"):
            planned = _plan_check(config, held, model, tokenizer, engine)
            if planned.examples:
                checked = check(bank, weights, held, examples=planned.examples, method=config.compose,
                                seed=config.seed + 1, singles=planned.singles, tops=config.check_tops, scales=planned.scales,
                                criterion=planned.criterion, layers=refined.layers if refined else None, model=model,
                                tokenizer=tokenizer, engine=engine, rank=config.rank)
                weights = checked.coefficients
    layers = checked.layers if checked else refined.layers if refined else None

    with atomic_dir(out, force=force) as tmp:
        base_kept = checked is not None and not checked.beats_base  # an adapter whose update is zero
        with stage("compose"):
            p = plan(bank, weights, method=config.compose, rank=config.rank, dtype=DTYPES.get(config.dtype or ""),
                     allow_zero=base_kept, layers=layers)
            composition = write_compositions([tmp], bank, [p], f"composing ({config.compose})")[0]
        report = _report(config, spec, index, dataset, composition, weights, d)
        if tuning:
            with stage("finetune"):
                report.finetune = finetune(tmp, bank, refine_samples, config, from_composition=not base_kept, model=model,
                                           tokenizer=tokenizer)
        if calibration is not None:
            best = calibration.best
            report.calibration = CalibrationInfo(best.temperature, best.top_k, best.scale,
                                                 round(calibration.mean_ratio(best), 4), len(calibration.entries))
        if refined:
            report.refine = RefineInfo(
                len(refine_samples), config.refine_method, config.refine_budget, coefficients, refined.initial_loss,
                refined.loss, refined.steps, refined.history,
                {str(k): {n: w for n, w in v.items() if w != 0} for k, v in refined.layers.items()} if refined.layers else None,
                seconds=round(refined.seconds, 2),
            )
        report.check_plan = planned
        if checked:
            report.scale = float(sum(weights.values()))
            report.check = CheckInfo(checked.examples, checked.criterion,
                                     {k: {m: round(x, 5) for m, x in asdict(v).items() if x is not None}
                                      for k, v in checked.scores.items()},
                                     checked.chosen, checked.beats_base, "llama.cpp" if engine else "torch")
        report.write(tmp)
    log.info("seconds per stage: %s", ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    return GenerateResult(Path(out), weights, report.distances, report, seconds)


def _plan_check(config: GenerateConfig, held: Dataset, model: Any, tokenizer: Any, engine: Any) -> CheckPlan:
    """The check `config` asks for on `held`: --check N as asked; --check auto planned from the runtime's speed,
    measured on one held-out example, to fit --check-budget (check.plan_check)."""
    if not config.check_auto:
        return CheckPlan(config.check_examples, config.check_criterion, config.check_singles, list(CHECK_SCALES), "as asked")
    sample = held.subsample(1, config.seed + 1).samples[0]
    speed = engine.speed(sample) if engine is not None else pytorch.speed(model, tokenizer, sample)
    plan = plan_check(held, engine.tokenizer if engine is not None else tokenizer, speed, examples=config.check_examples,
                      criterion=config.check_criterion, singles=config.check_singles, tops=config.check_tops,
                      scales=CHECK_SCALES, budget=config.check_budget, seed=config.seed + 1)
    if plan.mode != "full":
        log.warning("held-out check %s: %s", plan.mode, plan.why)
    return plan


# generate's stages, in order: opening the bank and the dataset (and checking them), loading the base model (--check,
# --refine), the dataset's signature (with the encoder's load), distances to the entries (reading their cached
# signatures), coefficients, a weight search, the held-out check, composing and writing, fine-tuning.
STAGES = ("open", "base model", "signature", "distances", "coefficients", "refine", "check", "compose", "finetune")


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall seconds of the block to seconds[name] (a stage of STAGES)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def _report(
    config: GenerateConfig,
    spec: SignatureSpec,
    index: BankIndex,
    dataset: Dataset,
    composition: Composition,
    coefficients: dict[str, float],
    d: Sequence[float],
) -> Report:
    """The contents of loramix.json."""
    bank, mode = index.bank, index.mode(config.entry_signatures)
    weighted = index.weighted(mode)
    return Report(
        loramix_version=__version__,
        bank=str(bank.path.resolve()),
        base_model=bank.base_model,
        data=DataInfo(dataset.source, len(dataset), dataset.fingerprint()),
        signature=spec,
        distance=config.distance,
        operator=config.operator,
        temperature=config.temperature,
        top_k=config.top_k,
        compose=config.compose,
        rank=composition.rank,
        seed=config.seed,
        coefficients=coefficients,
        scale=config.scale,
        distances={e.name: float(x) for e, x in zip(weighted, d) if math.isfinite(x)},
        excluded=[e.name for e in bank.entries if e not in weighted],
        energy=EnergyInfo(composition.mean_energy, composition.min_energy, composition.energy),
        entry_signatures=mode,
        probed=[e.name for e in weighted if mode == "probes" or not e.has_data],
        probes=None if mode == "data" else config.probes or "default",
    )


@checked
def leave_one_out(
    bank: str | Path | Bank,
    out: str | Path,
    config: GenerateConfig | None = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    **overrides: Any,
) -> np.ndarray:
    """Predict every usable entry's adapter from the other entries and write each to OUT/<entry>/ (PEFT files and
    loramix.json), in one pass over the bank's tensors: each module of every entry is read once, however many
    outputs use it. Returns the coefficient matrix [usable, weighted] (`meta.loo_coefficients`)."""
    config = _configure(config, overrides)
    _refuse_empty_paths("leave_one_out", bank=bank, out=out)
    bank = bank if isinstance(bank, Bank) else Bank(bank, allow_pickle=allow_pickle)
    # OUT may exist: it holds one folder per entry
    refuse_target(out, force=True, inputs=_read_paths(config, bank.path, None, bank))
    if len(bank.usable) < 2:
        raise LoramixError(f"{bank.path}: leave-one-out needs at least 2 entries with data, found {len(bank.usable)}")
    index = BankIndex(bank)
    spec = index.resolve(config.signature_spec())
    _check_bank(index, config, spec)
    c = loo_coefficients(index, config)
    d = index.distance_matrix(spec, config.distance, config.seed, config.entry_signatures, config.probe_set())
    weighted = index.weighted(config.entry_signatures)
    names = [e.name for e in weighted]
    dtype = DTYPES.get(config.dtype or "")
    plans = [
        plan(bank, {n: float(x) for n, x in zip(names, row) if x > 0}, method=config.compose, rank=config.rank, dtype=dtype)
        for row in c
    ]
    with ExitStack() as stack:
        folders = [stack.enter_context(atomic_dir(Path(out) / e.name, force=force)) for e in bank.usable]
        compositions = write_compositions(folders, bank, plans, f"leave-one-out ({len(folders)} adapters)")
        for t, (folder, comp) in enumerate(zip(folders, compositions)):
            entry = bank.usable[t]
            row = np.where(np.arange(len(names)) == weighted.index(entry), np.inf, d[t])
            report = _report(config, spec, index, entry.dataset(), comp, dict(zip(names, map(float, c[t]))), row)
            report.leave_one_out = entry.name
            report.write(folder)
    return c
