"""The whole job, top-down as the data flows: dataset -> signature -> distances -> coefficients ->
composition -> adapter folder (PEFT files + loramix.json, written atomically)."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .version import __version__
from .adapter import DTYPES as _DTYPES
from .adapter import WEIGHTS_FILE, SafetensorsWriter
from .bank import Bank
from .compose import (
    Composition,
    LoraFactors,
    ModuleResult,
    Plan,
    compose_module,
    gram_matrix,
    plan,
    tensor_specs,
    write_composition,
    write_config,
    write_module,
)
from .data import Dataset, read_dataset
from .distances import distance_row, get_distance
from .errors import LoramixError
from .files import atomic_dir
from .index import BankIndex
from .operators import OPERATORS, Operator
from .progress import track
from .signatures import SIGNATURES, SignatureSpec, make_signer
from .threads import threaded_map

REPORT_FILE = "loramix.json"


@dataclass
class GenerateConfig:
    """Every choice `generate` makes. `rank`: an int, 'full', or None for the bank's largest rank;
    `top_k`: keep only the k largest coefficients; `model`: the embedding model (embed) or base model
    (unigram, hidden) when not the default / the bank's; `dtype`: of the output, default the bank's;
    `refine`: refine the top entries' weights on this many labelled examples of the data (0: off), by
    `refine_method` ('gradient' or 'nevergrad') within `refine_budget` seconds (see loramix.refine)."""

    signature: str = "embed"
    distance: str = "gaussian-w2"
    operator: str = "normalized"
    compose: str = "exact"
    rank: int | str | None = None
    top_k: int | None = None
    temperature: float = 1.0
    seed: int = 0
    max_samples: int | None = 128
    model: str | None = None
    dtype: str | None = None
    refine: int = 0
    refine_method: str = "gradient"
    refine_budget: float | None = None

    def signature_spec(self) -> SignatureSpec:
        return SignatureSpec(self.signature, self.model, self.max_samples, self.seed)

    def check(self) -> None:
        """Refuse unknown names and mismatched choices before any work is done."""
        kind = SIGNATURES.get(self.signature).kind
        get_distance(self.distance, kind)
        OPERATORS.get(self.operator)
        if self.rank not in (None, "full") and not (isinstance(self.rank, int) and self.rank >= 1):
            raise LoramixError(f"rank must be a positive integer or 'full', got {self.rank!r}")
        if self.top_k is not None and self.top_k < 1:
            raise LoramixError(f"top-k must be at least 1, got {self.top_k}")
        if not self.temperature > 0:
            raise LoramixError(f"temperature must be positive, got {self.temperature}")
        if self.refine < 0:
            raise LoramixError(f"--refine takes a number of examples, got {self.refine}")
        if self.refine_method not in ("gradient", "nevergrad"):
            raise LoramixError(f"refine method must be 'gradient' or 'nevergrad', got {self.refine_method!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise LoramixError(f"max-samples must be at least 1, got {self.max_samples}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise LoramixError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")


@dataclass
class GenerateResult:
    """What `generate` wrote and why: coefficients and distances per usable bank entry, and the report."""

    out: Path
    coefficients: dict[str, float]
    distances: dict[str, float]
    report: dict[str, Any] = field(repr=False)

    def top(self, n: int = 5) -> list[tuple[str, float]]:
        """The n largest coefficients, largest first."""
        return sorted(self.coefficients.items(), key=lambda kv: -kv[1])[:n]


def fit_operator(index: BankIndex, config: GenerateConfig) -> Operator:
    """The operator instance: fitted on the bank (cached in its index) when it is trainable."""
    cls = OPERATORS.get(config.operator)
    if not cls.trainable:
        return cls()
    space = "params" if config.compose == "paper" else "updates"
    return index.neural(config.signature_spec(), config.distance, space, config.seed)


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
    loramix.json). Settings come from `config`, with keyword overrides (e.g. `top_k=8`). `allow_pickle`: see Bank."""
    config = GenerateConfig(**{**asdict(config or GenerateConfig()), **overrides})
    config.check()
    bank = bank if isinstance(bank, Bank) else Bank(bank, allow_pickle=allow_pickle)
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    usable = bank.usable
    if not usable:
        raise LoramixError(f"{bank.path}: no bank entry has training data (train.jsonl), so none can be weighted")
    index = BankIndex(bank)
    spec = index.resolve(config.signature_spec())
    if SIGNATURES.get(spec.method).needs_base and spec.model is None:
        raise LoramixError(f"signature '{spec.method}' needs the base model: the bank names none, pass model=... (--model)")

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
        refined = refine(bank, coefficients, dataset, rcfg, mode=config.compose)

    with atomic_dir(out, force=force) as tmp:
        weights = refined.coefficients if refined else coefficients
        composition = write_composition(
            tmp, bank, weights, method=config.compose, rank=config.rank, dtype=_DTYPES.get(config.dtype or "")
        )
        report = _report(config, spec, bank, dataset, composition, weights, d)
        if refined:
            report["refine"] = {
                "examples": config.refine, "method": config.refine_method, "budget_seconds": config.refine_budget,
                "meta_coefficients": coefficients, "initial_loss": refined.initial_loss, "loss": refined.loss,
                "steps": refined.steps, "seconds": round(refined.seconds, 2), "history": refined.history,
            }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return GenerateResult(Path(out), weights, report["distances"], report)


def _report(
    config: GenerateConfig,
    spec: SignatureSpec,
    bank: Bank,
    dataset: Dataset,
    composition: Composition,
    coefficients: dict[str, float],
    d: Sequence[float],
) -> dict[str, Any]:
    """The contents of loramix.json."""
    usable = bank.usable
    return {
        "loramix_version": __version__,
        "bank": str(bank.path.resolve()),
        "base_model": bank.base_model,
        "data": {"path": dataset.source, "samples": len(dataset), "fingerprint": dataset.fingerprint()},
        "signature": asdict(spec),
        "distance": config.distance,
        "operator": config.operator,
        "temperature": config.temperature,
        "top_k": config.top_k,
        "compose": config.compose,
        "rank": composition.rank,
        "seed": config.seed,
        "coefficients": coefficients,
        "distances": {e.name: float(x) for e, x in zip(usable, d) if math.isfinite(x)},
        "excluded": [e.name for e in bank.entries if not e.has_data],
        "energy": {"mean": composition.mean_energy, "min": composition.min_energy, "per_module": composition.energy},
    }


def loo_coefficients(index: BankIndex, config: GenerateConfig, folds: int = 5) -> np.ndarray:
    """C[t] = the coefficients predicting usable entry t from the others, [n, n] with C[t, t] = 0: the operator on
    row t of the bank's distance matrix, t's own entry excluded. A trainable operator is cross-fitted: it is
    fitted on `folds` - 1 folds of the entries (entry t at position t falls in fold t % folds) for each fold."""
    config.check()
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
    gram = gram_matrix(index.bank, index.bank.usable, "params" if config.compose == "paper" else "updates")
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
    config = GenerateConfig(**{**asdict(config or GenerateConfig()), **overrides})
    bank = bank if isinstance(bank, Bank) else Bank(bank, allow_pickle=allow_pickle)
    index = BankIndex(bank)
    spec = index.resolve(config.signature_spec())
    c = loo_coefficients(index, config)
    d = index.distance_matrix(spec, config.distance, config.seed)
    names = [e.name for e in bank.usable]
    dtype = _DTYPES.get(config.dtype or "")
    plans = [
        plan(bank, {n: float(x) for n, x in zip(names, row) if x > 0}, method=config.compose, rank=config.rank, dtype=dtype)
        for row in c
    ]
    needed = [e for e in bank.entries if any(e.name in p.coefficients for p in plans)]
    compositions = [Composition(p.config, p.rank) for p in plans]
    serial = any(p.randomized for p in plans)  # else outputs are composed in parallel, see threaded_map
    with ExitStack() as stack:
        folders = [stack.enter_context(atomic_dir(Path(out) / name, force=force)) for name in names]
        writers = [stack.enter_context(SafetensorsWriter(f / WEIGHTS_FILE, tensor_specs(bank, p))) for f, p in zip(folders, plans)]
        for module in track(sorted(bank.shapes), f"leave-one-out ({len(names)} adapters)", total=len(bank.shapes)):
            factors = {e.name: LoraFactors.read(e, module) for e in needed if module in e.adapter.modules}

            def one(p: Plan) -> ModuleResult:
                return compose_module(bank, p, module, lambda e: factors[e.name])

            results = map(one, plans) if serial else threaded_map(one, plans)
            for p, w, comp, r in zip(plans, writers, compositions, results):
                write_module(w, p, module, r)
                comp.energy[module] = r.energy
        for t, (folder, p, comp) in enumerate(zip(folders, plans, compositions)):
            write_config(folder, p)
            entry = bank.usable[t]
            row = np.where(np.arange(len(names)) == t, np.inf, d[t])
            report = _report(config, spec, bank, entry.dataset(), comp, dict(zip(names, map(float, c[t]))), row)
            report["leave_one_out"] = entry.name
            (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return c


def read_report(adapter_dir: str | Path) -> dict[str, Any]:
    """The loramix.json of a generated adapter."""
    path = Path(adapter_dir) / REPORT_FILE
    if not path.is_file():
        raise LoramixError(f"{adapter_dir}: no {REPORT_FILE} (not an adapter written by loramix)")
    return json.loads(path.read_text(encoding="utf-8"))
