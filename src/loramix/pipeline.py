"""The whole job, top-down as the data flows: dataset -> signature -> distances -> coefficients ->
composition -> adapter folder (PEFT files + loramix.json, written atomically)."""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .adapter import DTYPES
from .bank import Bank
from .compose import COMPOSERS, Composition, plan, write_compositions
from .config import GenerateConfig
from .data import Dataset, read_dataset
from .distances import distance_row
from .errors import LoramixError
from .files import atomic_dir
from .index import BankIndex
from .operators import OPERATORS, Operator, gram_matrix
from .report import DataInfo, EnergyInfo, RefineInfo, Report
from .signatures import SIGNATURES, SignatureSpec, make_signer
from .version import __version__



@dataclass
class GenerateResult:
    """What `generate` wrote and why: coefficients and distances per usable bank entry, and the report."""

    out: Path
    coefficients: dict[str, float]
    distances: dict[str, float]
    report: Report = field(repr=False)

    def top(self, n: int = 5) -> list[tuple[str, float]]:
        """The n largest coefficients, largest first."""
        return sorted(self.coefficients.items(), key=lambda kv: -kv[1])[:n]


def fit_operator(index: BankIndex, config: GenerateConfig) -> Operator:
    """The operator instance: fitted on the bank (cached in its index) when it is trainable, in the Gram space
    that the composition method declares."""
    cls = OPERATORS.get(config.operator)
    if not cls.trainable:
        return cls()
    space = COMPOSERS.get(config.compose).operator_space
    return index.fitted_operator(config.operator, config.signature_spec(), config.distance, space, config.seed)


def _configure(config: GenerateConfig | None, overrides: dict[str, Any]) -> GenerateConfig:
    """`config` (default GenerateConfig()) with keyword overrides, validated."""
    return replace(config or GenerateConfig(), **overrides)


def _check_bank(bank: Bank, config: GenerateConfig, spec: SignatureSpec) -> None:
    """Refuse what this bank cannot do with `config` before any signature is computed."""
    if not bank.usable:
        raise LoramixError(f"{bank.path}: no bank entry has training data (train.jsonl), so none can be weighted")
    if SIGNATURES.get(spec.method).needs_base and spec.model is None:
        raise LoramixError(f"signature '{spec.method}' needs the base model: the bank names none, pass model=... (--model)")
    operator = OPERATORS.get(config.operator)
    if operator.trainable and len(bank.usable) < operator.min_entries:
        raise LoramixError(f"operator '{config.operator}' needs at least {operator.min_entries} bank entries with data to fit")
    COMPOSERS.get(config.compose)().check(bank.entries)


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
    bank = bank if isinstance(bank, Bank) else Bank(bank, allow_pickle=allow_pickle)
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    usable = bank.usable
    index = BankIndex(bank)
    spec = index.resolve(config.signature_spec())
    _check_bank(bank, config, spec)

    bank_sigs = index.signatures(spec)
    user_sig = make_signer(spec)(dataset)
    d = distance_row(config.distance, user_sig, bank_sigs, config.seed)
    operator = fit_operator(index, config)
    c = operator.coefficients(d, config.temperature, config.top_k)
    coefficients = {e.name: float(x) for e, x in zip(usable, c)}
    refined = None
    if config.refine:
        from .refine import RefineConfig, refine

        rcfg = RefineConfig(examples=config.refine, top_k=config.top_k or 8, method=config.refine_method,
                            budget=config.refine_budget, seed=config.seed)
        refined = refine(bank, coefficients, dataset, rcfg, method=config.compose)

    with atomic_dir(out, force=force) as tmp:
        weights = refined.coefficients if refined else coefficients
        p = plan(bank, weights, method=config.compose, rank=config.rank, dtype=DTYPES.get(config.dtype or ""))
        composition = write_compositions([tmp], bank, [p], f"composing ({config.compose})")[0]
        report = _report(config, spec, bank, dataset, composition, weights, d)
        if refined:
            report.refine = RefineInfo(
                config.refine, config.refine_method, config.refine_budget, coefficients, refined.initial_loss,
                refined.loss, refined.steps, round(refined.seconds, 2), refined.history,
            )
        report.write(tmp)
    return GenerateResult(Path(out), weights, report.distances, report)


def _report(
    config: GenerateConfig,
    spec: SignatureSpec,
    bank: Bank,
    dataset: Dataset,
    composition: Composition,
    coefficients: dict[str, float],
    d: Sequence[float],
) -> Report:
    """The contents of loramix.json."""
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
        distances={e.name: float(x) for e, x in zip(bank.usable, d) if math.isfinite(x)},
        excluded=[e.name for e in bank.entries if not e.has_data],
        energy=EnergyInfo(composition.mean_energy, composition.min_energy, composition.energy),
    )


def loo_coefficients(index: BankIndex, config: GenerateConfig, folds: int = 5) -> np.ndarray:
    """C[t] = the coefficients predicting usable entry t from the others, [n, n] with C[t, t] = 0: the operator on
    row t of the bank's distance matrix, t's own entry excluded. A trainable operator is cross-fitted: it is
    fitted on `folds` - 1 folds of the entries (entry t at position t falls in fold t % folds) for each fold."""
    spec = index.resolve(config.signature_spec())
    d = index.distance_matrix(spec, config.distance, config.seed).copy()
    np.fill_diagonal(d, np.inf)
    n = len(d)
    c = np.zeros((n, n))
    cls = OPERATORS.get(config.operator)
    if not cls.trainable:
        op = cls()
        for t in range(n):
            c[t] = op.coefficients(d[t], config.temperature, config.top_k)
        return c
    gram = gram_matrix(index.bank, index.bank.usable, COMPOSERS.get(config.compose).operator_space)
    fold = np.arange(n) % folds
    for f in range(folds):
        train = np.flatnonzero(fold != f)
        op = cls().fit(d[np.ix_(train, train)], gram[np.ix_(train, train)], seed=config.seed)
        for t in np.flatnonzero(fold == f):
            c[t] = op.coefficients(d[t], config.temperature, config.top_k)
    return c


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
    outputs use it. Returns the coefficient matrix [n, n] (`loo_coefficients`)."""
    config = _configure(config, overrides)
    bank = bank if isinstance(bank, Bank) else Bank(bank, allow_pickle=allow_pickle)
    index = BankIndex(bank)
    spec = index.resolve(config.signature_spec())
    _check_bank(bank, config, spec)
    c = loo_coefficients(index, config)
    d = index.distance_matrix(spec, config.distance, config.seed)
    names = [e.name for e in bank.usable]
    dtype = DTYPES.get(config.dtype or "")
    plans = [
        plan(bank, {n: float(x) for n, x in zip(names, row) if x > 0}, method=config.compose, rank=config.rank, dtype=dtype)
        for row in c
    ]
    with ExitStack() as stack:
        folders = [stack.enter_context(atomic_dir(Path(out) / name, force=force)) for name in names]
        compositions = write_compositions(folders, bank, plans, f"leave-one-out ({len(names)} adapters)")
        for t, (folder, comp) in enumerate(zip(folders, compositions)):
            entry = bank.usable[t]
            row = np.where(np.arange(len(names)) == t, np.inf, d[t])
            report = _report(config, spec, bank, entry.dataset(), comp, dict(zip(names, map(float, c[t]))), row)
            report.leave_one_out = entry.name
            report.write(folder)
    return c
