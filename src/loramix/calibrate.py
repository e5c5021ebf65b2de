"""Beyond the paper: the meta-operator's free parameters chosen by the answer loss they give (forward passes only).

A candidate is (temperature, top_k, scale): the operator's coefficients at that temperature and top-k, multiplied
by `scale`, the composed update's global scale (scale 0 is the base model). Its loss on a task is the answer-token
cross-entropy (nats per token) of the task's examples under the base model plus that update, applied exactly by
forward hooks (runtime.lora.MixedLoRA): nothing is composed or written.

- `calibrate(bank, config)`: the bank's own leave-one-out. Each usable entry is held out in turn, its coefficients
  predicted from the others, and every candidate scored on `examples` of the entry's own training samples (which
  no other entry was trained on). The candidate with the lowest mean loss ratio to the base model wins. Cached
  with the bank index; `generate --calibration` uses a calibrated bank's parameters.
The user's own held-out check of candidates is `loramix.check`."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Sequence

import numpy as np
import torch

from .arguments import Range, checked
from .bank import Bank
from .config import GenerateConfig
from .errors import LoramixError
from .index import BankIndex
from .store import fetch, store
from .bank_operator import loo_coefficients
from .progress import track
from .runtime.lora import MixedLoRA
from .runtime.pytorch import answer_loss_fn, frozen_base

# The default grid: 12 candidates, 13 forward passes per bank entry (about 3 minutes for the 47-entry default bank on
# 2 cores with 8 examples each; 40 candidates with top-k 5 and 16 examples took over half an hour).
TEMPERATURES = (0.5, 1.0, 2.0)
TOP_KS: tuple[int | None, ...] = (None,)
SCALES = (0.5, 1.0, 1.5, 2.0)
EXAMPLES = 8


@dataclass(frozen=True)
class Candidate:
    """Coefficients at `temperature` and `top_k`, the composed update scaled by `scale`."""

    temperature: float
    top_k: int | None
    scale: float


def grid() -> list[Candidate]:
    return [Candidate(t, k, s) for t in TEMPERATURES for k in TOP_KS for s in SCALES]


@dataclass
class Calibration:
    """A bank's leave-one-out losses for every candidate: `loss[t][j]` is entry t's answer loss (nats per token) under
    candidate j, `base_loss[t]` under the base model; `examples` training samples per entry. `best` is the chosen
    candidate; `seconds` the CPU time the calibration took."""

    setting: dict[str, Any]
    examples: int
    entries: list[str]
    candidates: list[Candidate]
    base_loss: list[float]
    loss: list[list[float]]
    seconds: float
    best: Candidate = field(init=False)

    def __post_init__(self) -> None:
        self.best = self.select()

    def ratios(self) -> np.ndarray:
        """loss / base loss, [entries, candidates]: below 1 where the candidate helps that entry."""
        return np.asarray(self.loss) / np.asarray(self.base_loss)[:, None]

    def mean_ratio(self, candidate: Candidate) -> float:
        """The mean loss ratio to the base model of `candidate` over every entry."""
        return float(self.ratios()[:, self.candidates.index(candidate)].mean())

    def select(self, entries: Sequence[int] | None = None) -> Candidate:
        """The candidate of lowest mean loss ratio over `entries` (indices; default all)."""
        r = self.ratios()
        rows = r if entries is None else r[list(entries)]
        return self.candidates[int(np.argmin(rows.mean(0)))]

    def to_json(self) -> str:
        d = asdict(self)
        d["candidates"] = [asdict(c) for c in self.candidates]
        d["best"] = asdict(self.best)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        d = json.loads(text)
        d.pop("best", None)
        d["candidates"] = [Candidate(**c) for c in d["candidates"]]
        return cls(**d)


def _setting(config: GenerateConfig) -> dict[str, Any]:
    """The parts of `config` that a calibration is for (the rest it chooses, or does not affect it)."""
    return {"signature": asdict(config.signature_spec()), "distance": config.distance, "operator": config.operator,
            "compose": config.compose, "entry_signatures": config.entry_signatures, "probes": config.probes,
            **({"operator_options": config.operator_options} if config.operator_options else {})}


def _key(index: BankIndex, config: GenerateConfig, candidates: Sequence[Candidate]) -> str:
    """Changes with the setting, the grid, the signatures' model and the base model (by content: `index.spec_key`,
    `base_identity`) and every entry it weights (its data's sha256, its adapter files' sha256: `adapter_hash`)."""
    from .runtime import base_identity
    from .store import adapter_hash

    entries = [f"{e.name}:{e.data_hash if e.has_data else '-'}:{adapter_hash(e.adapter.path)}"
               for e in index.weighted(config.entry_signatures)]
    models = [index.spec_key(index.resolve(config.signature_spec())), base_identity(index.bank.base_model),
              config.probe_set().key(None) if index.mode(config.entry_signatures) != "data" else None]
    blob = json.dumps([_setting(config), [asdict(c) for c in candidates], entries, models], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@checked
def calibrate(bank: Bank, config: GenerateConfig | None = None, *, examples: Annotated[int, Range(1, None)] = EXAMPLES,
              candidates: Sequence[Candidate] | None = None, model: Any = None, tokenizer: Any = None,
              force: bool = False) -> Calibration:
    """The bank's leave-one-out losses for every candidate under `config`'s signature, distance, operator and
    composition; cached in the bank index (computed again with `force` or another number of `examples`). Loads the
    bank's base model unless given."""
    config = config or GenerateConfig()
    candidates = list(candidates or grid())
    index = BankIndex(bank)
    entries = bank.usable
    if len(entries) < 3:
        raise LoramixError(f"{bank.path}: calibration needs at least 3 bank entries with data, found {len(entries)}")
    examples = min(examples, max(len(e.dataset()) for e in entries))  # what is used: recorded, and compared
    stem = index.dir / "calibration" / _key(index, config, candidates)
    cached = _read(stem)
    if cached is not None and cached.examples == examples and not force:
        return cached
    start = time.process_time()
    model, tokenizer = frozen_base(bank.base_model, model, tokenizer)
    coefs = {(c.temperature, c.top_k): loo_coefficients(index, replace(config, temperature=c.temperature, top_k=c.top_k))
             for c in candidates}
    weighted = index.weighted(config.entry_signatures)  # the coefficients' columns
    mixed = MixedLoRA(model, bank, weighted, config.compose)
    base_loss, loss = [], []
    try:
        with torch.no_grad():
            for t, entry in enumerate(track(entries, "calibrating (leave-one-out)", total=len(entries))):
                fn = answer_loss_fn(model, tokenizer, entry.dataset().subsample(examples, config.seed).samples)
                mixed.weights = torch.zeros(len(weighted))
                base_loss.append(float(fn()))
                row = []
                for c in candidates:
                    mixed.weights = torch.as_tensor(c.scale * coefs[(c.temperature, c.top_k)][t], dtype=torch.float32)
                    row.append(float(fn()))
                loss.append(row)
    finally:
        mixed.remove()
    cal = Calibration(_setting(config), examples, [e.name for e in entries], candidates, base_loss, loss,
                      round(time.process_time() - start, 2))
    store(index.dir, stem, cal.to_json().encode(), "json")
    return cal


def _read(stem: Path) -> Calibration | None:
    """The calibration stored for `stem` in the bank index; None when there is none, it fails its check, or it is of
    a form this version does not read (then it is recomputed)."""
    data = fetch(stem, "json")
    try:
        return None if data is None else Calibration.from_json(data.decode())
    except (ValueError, TypeError, KeyError):
        return None


def cached_calibration(bank: Bank, config: GenerateConfig) -> Calibration | None:
    """The bank's calibration for `config`'s setting (default grid) if `loramix bank calibrate` computed it."""
    index = BankIndex(bank)
    return _read(index.dir / "calibration" / _key(index, config, grid()))
