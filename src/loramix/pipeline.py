"""The whole job, top-down as the data flows: dataset -> signature -> distances -> coefficients ->
composition -> adapter folder (PEFT files + loramix.json, written atomically)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__
from .bank import Bank
from .compose import Composition, write_composition
from .data import Dataset, read_dataset
from .distances import distance_row, get_distance
from .errors import LoramixError
from .files import atomic_dir
from .index import BankIndex
from .operators import OPERATORS, Operator
from .signatures import SIGNATURES, SignatureSpec, make_signer

REPORT_FILE = "loramix.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerateConfig:
    """Every choice `generate` makes. `rank`: an int, 'full', or None for the bank's largest rank;
    `top_k`: keep only the k largest coefficients; `model`: the embedding model (embed) or base model
    (unigram, hidden) when not the default / the bank's; `dtype`: of the output, default the bank's."""

    signature: str = "embed"
    distance: str = "w2"
    operator: str = "normalized"
    compose: str = "exact"
    rank: int | str | None = None
    top_k: int | None = None
    temperature: float = 1.0
    seed: int = 0
    max_samples: int | None = 256
    model: str | None = None
    dtype: str | None = None

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
    **overrides: Any,
) -> GenerateResult:
    """Compose a new adapter for `data` from `bank` and write it to `out` (a PEFT adapter folder plus
    loramix.json). Settings come from `config`, with keyword overrides (e.g. `top_k=8`)."""
    config = GenerateConfig(**{**asdict(config or GenerateConfig()), **overrides})
    config.check()
    bank = bank if isinstance(bank, Bank) else Bank(bank)
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

    with atomic_dir(out, force=force) as tmp:
        composition = write_composition(
            tmp, bank, coefficients, method=config.compose, rank=config.rank, dtype=_DTYPES.get(config.dtype or "")
        )
        report = _report(config, spec, bank, dataset, composition, coefficients, d)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    bank.close()
    return GenerateResult(Path(out), coefficients, report["distances"], report)


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
    energy = composition.energy
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
        "distances": {e.name: float(x) for e, x in zip(usable, d)},
        "excluded": [e.name for e in bank.entries if not e.has_data],
        "energy": {
            "mean": composition.mean_energy,
            "min": float(min(energy.values())) if energy else 1.0,
            "per_module": energy,
        },
    }


def read_report(adapter_dir: str | Path) -> dict[str, Any]:
    """The loramix.json of a generated adapter."""
    path = Path(adapter_dir) / REPORT_FILE
    if not path.is_file():
        raise LoramixError(f"{adapter_dir}: no {REPORT_FILE} (not an adapter written by loramix)")
    return json.loads(path.read_text(encoding="utf-8"))
