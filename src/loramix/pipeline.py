"""The whole job, top-down as the data flows: dataset -> signature -> distances -> coefficients ->
composition -> adapter folder (PEFT files + loramix.json, written atomically)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .adapter import DTYPES
from .arguments import checked
from .bank import Bank
from .compose import Composition, plan, write_compositions
from .config import AUTO_REFINE_SECONDS, CHECK_EXAMPLES, GenerateConfig
from .refine import REFINE_METHODS, RefineConfig, RefineInfo, refine, refine_estimate, refuse_slow_refine
from .data import Dataset, read_dataset
from .errors import LoramixError, named, setting
from .files import atomic_dir, refuse_target
from .runtime import base_paths
from .index import BankIndex
from .bank_operator import loo_coefficients, operator_for
from .paths import resolve_bank
from .calibrate import cached_calibration
from .check import check, check_plan
from .report import CalibrationInfo, CheckInfo, CheckPlan, DataInfo, EnergyInfo, Report
from .signatures import SignatureSpec, make_signer
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
    run = _Run.open(bank, data, out, config, force, allow_pickle)
    with run.stage("base model"):
        run.load_base()
    with run.engine if run.engine is not None else nullcontext():
        run.calibrate()
        with run.stage("signature"):
            user = make_signer(run.spec)(run.dataset)
        with run.stage("distances"):
            run.distances(user)
        with run.stage("coefficients"):
            run.coefficients()
        run.search_weights()  # a weight search (--refine-method gradient, nevergrad): before the check
        run.check()
        run.write(out, force)  # composed, then trained by a refine method that trains the adapter (finetune)
    log.info("seconds per stage: %s", ", ".join(f"{k} {v:.2f}" for k, v in run.seconds.items()))
    return GenerateResult(Path(out), run.weights, run.report.distances, run.report, run.seconds)


@dataclass
class _Run:
    """One `generate`: its inputs, what each stage made (`d` distances [weighted], `meta` and `weights` coefficients
    per weighted entry: the operator's, and those the search and the check chose), and seconds per stage."""

    bank: Bank
    dataset: Dataset
    config: GenerateConfig
    index: BankIndex
    spec: SignatureSpec
    seconds: dict[str, float]
    model: Any = None
    tokenizer: Any = None
    engine: Any = None  # the check's llama.cpp runtime (runtime.llamacpp.LlamaCpp), else None
    refine_n: int = 0  # the examples refinement uses, and those the check holds out (decided when the base loads)
    check_n: int = 0
    refine_plan: str | None = None  # what `refine` auto decided, and why
    calibration: Any = None
    d: Any = None
    meta: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    refine_samples: Dataset | None = None
    refined: RefineInfo | None = None
    planned: CheckPlan | None = None
    checked: CheckInfo | None = None
    report: Report | None = None

    def stage(self, name: str):
        """Time the block as stage `name` (STAGES)."""
        return _timed(self.seconds, name)

    @classmethod
    def open(cls, bank: str | Path | Bank, data: str | Path | Dataset, out: str | Path, config: GenerateConfig,
             force: bool, allow_pickle: bool) -> "_Run":
        """Open the bank and the dataset and check what `config` asks of them (the 'open' stage)."""
        seconds: dict[str, float] = {}
        with _timed(seconds, "open"):
            refuse_target(out, force=force, inputs=_read_paths(config, bank.path if isinstance(bank, Bank) else resolve_bank(bank),
                                                               None if isinstance(data, Dataset) else data))
            bank = bank if isinstance(bank, Bank) else Bank(bank, allow_pickle=allow_pickle)
            if config.base is None:  # the bank's base, known once it is open
                refuse_target(out, force=True, inputs={"the base model": base_paths(bank.base_model)})
            dataset = data if isinstance(data, Dataset) else read_dataset(data)
            if not len(dataset):
                raise LoramixError(f"{dataset.source}: the dataset has no samples")
            index = BankIndex(bank)
            spec = index.resolve(config.signature_spec())
            config.check_bank(index, spec)
        return cls(bank, dataset, config, index, spec, seconds)

    def load_base(self) -> None:
        """The base model, when the configuration runs it (`refine`, the check, probe answers), loaded before any
        other work so that a base that cannot be loaded is reported at once: on PyTorch (refinement always, the check
        and probe answers unless the runtime is llama.cpp: `engine`); None where unused (PyTorch probe answers load the
        base themselves, only when not cached). `refine` auto is declined on llama.cpp (the check runs instead)."""
        from .runtime import choose_runtime, resolve_base
        from .runtime.pytorch import load_model, load_tokenizer

        config = self.config
        self.refine_n, self.check_n = config.refine_examples, config.check_examples
        base = config.base if config.base is not None else self.bank.base_model
        probing = self.index.mode(config.entry_signatures).probes
        if not (self.refine_n or self.check_n or (probing and (config.base is not None or config.runtime != "auto"))):
            return
        try:
            on_llamacpp = choose_runtime(resolve_base(base), config.runtime) == "llama.cpp"
            if on_llamacpp and config.refine_auto and self.refine_n:
                self._decline("the base runs on llama.cpp and refinement trains on PyTorch")
            if on_llamacpp and (self.check_n or probing):
                from .runtime.llamacpp import open_base

                self.engine = open_base(base)
            if self.refine_n or (not on_llamacpp and (self.check_n or config.base is not None)):
                self.model, self.tokenizer = load_model(base), load_tokenizer(base)
        except LoramixError as e:
            if self.engine is not None:
                self.engine.close()
            why = (f"{setting('refine', 'auto')} trains on the base model; {setting('check', 0)} composes without it"
                   if self.refine_n and config.refine_auto else
                   f"{setting('refine', self.refine_n)} runs the base model" if self.refine_n else (
                f"the held-out check ({setting('check', self.check_n)}) runs the base model; {setting('check', 0)} "
                "skips it" if self.check_n else "the entries without data answer probe prompts on the base model"))
            raise LoramixError(f"{e.template} ({why})") from None

    def _decline(self, why: str) -> None:
        """`refine` auto does not refine: the check runs instead (auto, as refinement is auto only with it)."""
        self.refine_n, self.check_n = 0, CHECK_EXAMPLES
        self.refine_plan = f"not refined: {why}; checked instead"
        log.info("refine auto: %s", self.refine_plan)

    def calibrate(self) -> None:
        """With `calibration`: the bank's calibrated temperature, top-k and scale replace the options they cover."""
        config = self.config
        if not config.calibration:
            return
        self.calibration = cached_calibration(self.bank, config)
        if self.calibration is None:
            log.warning("%s has no calibration for this setting (or its entries changed since): the options' own "
                        "values are used; run `loramix bank calibrate %s`", self.bank.path, self.bank.path)
            return
        best = self.calibration.best
        self.config = replace(config, temperature=best.temperature, top_k=best.top_k, scale=best.scale)

    def distances(self, user: Any) -> None:
        config = self.config
        self.d = self.index.distance_row(self.spec, config.distance, user, config.entry_signatures, config.probe_set(),
                                         config.seed, model=self.model, tokenizer=self.tokenizer, base=self.engine,
                                         base_name=config.base)

    def coefficients(self) -> None:
        config = self.config
        c = operator_for(self.index, config).coefficients(self.d, config.temperature, config.top_k)
        weighted = self.index.weighted(config.entry_signatures)
        self.meta = self.weights = {e.name: config.scale * float(x) for e, x in zip(weighted, c)}

    def search_weights(self) -> None:
        """Draw the examples of `refine` (refusing a refinement estimated too slow) and run a weight search."""
        config = self.config
        if not self.refine_n:
            return
        if self.refine_n > len(self.dataset) and not config.refine_auto:
            log.warning("refine %d: %s has %d examples; all of them are used", self.refine_n, self.dataset.source,
                        len(self.dataset))
        self.refine_samples = self.dataset.subsample(self.refine_n, config.seed)
        if config.refine_auto:  # refined only when this CPU does it within AUTO_REFINE_SECONDS
            seconds, _, what = refine_estimate(config, self.refine_samples, self.model, self.tokenizer)
            if seconds > AUTO_REFINE_SECONDS:
                self.refine_samples = None
                return self._decline(f"{named(what)}, over {AUTO_REFINE_SECONDS:g} s")
            self.refine_plan = f"refined: {named(what)}, within {AUTO_REFINE_SECONDS:g} s"
        else:
            refuse_slow_refine(config, self.refine_samples, self.model, self.tokenizer)
        method = REFINE_METHODS.get(config.refine_method)
        if not method.searches:
            return
        rcfg = RefineConfig.of(config.refine_method, config.refine_options, examples=self.refine_n,
                               top_k=config.top_k or RefineConfig.top_k, steps=config.refine_steps or method.steps,
                               budget=config.refine_budget, per_layer=config.refine_per_layer, seed=config.seed)
        with self.stage("refine"):
            self.refined = refine(self.bank, self.meta, self.refine_samples, rcfg, method=config.compose, model=self.model,
                                  tokenizer=self.tokenizer)
        self.weights = self.refined.coefficients

    def check(self) -> None:
        """The held-out check on the examples refinement did not use, planned (`check` auto) to fit its budget."""
        config = self.config
        if not self.check_n:
            return
        used = set(self.refine_samples.samples) if self.refine_samples else set()
        held = Dataset([s for s in self.dataset.samples if s not in used], self.dataset.source)
        if not held.samples:
            raise LoramixError(f"{self.dataset.source}: no examples left for the check after refining on "
                               f"{self.refine_n}: give more examples than it uses, or {setting('check', 0)}")
        with self.stage("check"):
            self.planned = check_plan(config, held, self.model, self.tokenizer, self.engine, self.check_n)
            if self.planned.examples:
                self.checked = check(self.bank, self.weights, held, examples=self.planned.examples, method=config.compose,
                                     seed=config.seed + 1, singles=self.planned.singles, tops=config.check_tops,
                                     scales=self.planned.scales, criterion=self.planned.criterion,
                                     layers=self.refined.layer_weights() if self.refined else None, model=self.model,
                                     tokenizer=self.tokenizer, engine=self.engine, rank=config.rank)
                self.weights = self.checked.coefficients

    def write(self, out: str | Path, force: bool) -> None:
        """Compose the chosen weights into `out` (atomically), train it when the refine method trains, write the
        report."""
        config = self.config
        layers = self.checked.layers if self.checked else self.refined.layer_weights() if self.refined else None
        with atomic_dir(out, force=force) as tmp:
            base_kept = self.checked is not None and not self.checked.beats_base  # an adapter whose update is zero
            with self.stage("compose"):
                p = plan(self.bank, self.weights, method=config.compose, rank=config.rank,
                         dtype=DTYPES.get(config.dtype or ""), allow_zero=base_kept, layers=layers)
                composition = write_compositions([tmp], self.bank, [p], f"composing ({config.compose})")[0]
            self.report = report = _report(config, self.spec, self.index, self.dataset, composition, self.weights, self.d)
            method = REFINE_METHODS.get(config.refine_method)
            if self.refine_n and not method.searches:
                with self.stage("finetune"):
                    report.finetune = method().train(tmp, self.bank, self.refine_samples, config,
                                                     from_composition=not base_kept, model=self.model,
                                                     tokenizer=self.tokenizer)
            if self.calibration is not None:
                best = self.calibration.best
                report.calibration = CalibrationInfo(best.temperature, best.top_k, best.scale,
                                                     round(self.calibration.mean_ratio(best), 4),
                                                     len(self.calibration.entries))
            report.refine, report.check_plan, report.check = self.refined, self.planned, self.checked
            report.refine_plan = self.refine_plan
            if self.checked:
                report.scale = float(sum(self.weights.values()))
            report.write(tmp)


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
    weighted = mode.weighted(bank)
    return Report(
        loramix_version=__version__,
        bank=str(bank.path.resolve()),
        base_model=bank.base_model,
        data=DataInfo(dataset.source, len(dataset), dataset.fingerprint()),
        config=config,
        signature=spec,
        rank=composition.rank,
        coefficients=coefficients,
        scale=config.scale,
        distances={e.name: float(x) for e, x in zip(weighted, d) if math.isfinite(x)},
        excluded=[e.name for e in bank.entries if e not in weighted],
        energy=EnergyInfo(composition.mean_energy, composition.min_energy, composition.energy),
        entry_signatures=mode.name,
        probed=[e.name for e in mode.probed(bank)],
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
    config.check_bank(index, spec)
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
