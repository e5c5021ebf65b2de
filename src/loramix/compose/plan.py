"""What a composition will write, fixed before any tensor is read: the entries with non-zero coefficients, the
method, every output module's rank and scale, the output dtype and adapter_config.json. Every refusal happens here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from ..adapter import DTYPES, TENSOR_PREFIX, LoraModule, applied_by_peft, layer_of, lora_config
from ..arguments import checked, finite
from ..bank import Bank, BankEntry
from ..errors import LoramixError
from .base import COMPOSERS, Composer, LoraFactors, Rank, Term


@dataclass
class Plan:
    """One output: `composer` applied to the `active` entries with their `coefficients` (or, in a layer that `layers`
    names, with that layer's: layer -> entry -> coefficient); `refs` holds each module as the first entry that has
    it stores it (shape, rank, scale); `target` is the rank handed to the composer."""

    composer: Composer
    coefficients: dict[str, float]
    active: list[BankEntry]
    refs: dict[str, LoraModule]
    target: int | None
    ranks: dict[str, int]
    scales: dict[str, float]
    rank: int | None  # as reported: None for the entries' own ranks
    dtype: torch.dtype
    config: dict
    layers: dict[int, dict[str, float]] | None = None

    @property
    def serial(self) -> bool:
        """Modules must run one at a time with multi-threaded ops (see Composer.serial)."""
        return self.composer.serial(self.active, self.target)

    def terms(self, module: str, factors: Mapping[str, LoraFactors]) -> list[Term]:
        """The active entries' terms for `module`, `factors[name]` giving each entry's factors."""
        coefficients = (self.layers or {}).get(layer_of(module), self.coefficients)
        return [
            Term(factors[e.name], coefficients.get(e.name, 0.0), e.adapter.modules[module].scale)
            for e in self.active
            if module in e.adapter.modules
        ]

    def tensor_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
        """Name -> (dtype, shape) of every tensor of the output file."""
        specs = {}
        for m, ref in self.refs.items():
            specs[f"{TENSOR_PREFIX}{m}.lora_A.weight"] = (self.dtype, (self.ranks[m], ref.in_features))
            specs[f"{TENSOR_PREFIX}{m}.lora_B.weight"] = (self.dtype, (ref.out_features, self.ranks[m]))
        return specs


@checked
def plan(bank: Bank, coefficients: dict[str, Any], *, method: str = "exact", rank: Rank = None,
         dtype: torch.dtype | str | None = None, allow_zero: bool = False,
         layers: dict[int, dict[str, Any]] | None = None) -> Plan:
    """Check the request and fix the output's shape. `rank`: an int truncates (exact) to that rank; None is the
    bank's largest rank; 'full' keeps every singular value (all modules padded to one rank). All-zero coefficients
    are refused unless `allow_zero` (the output is then an adapter whose update is zero: the base model). `layers`
    (layer index -> entry -> coefficient) replaces `coefficients` in the layers it names. `dtype`: a torch dtype or
    its name (float32, float16, bfloat16); default the bank's. Coefficients are checked below (finite numbers)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LoramixError(f"dtype must be one of {', '.join(DTYPES)} (or a torch.dtype), got {dtype!r}")
        dtype = DTYPES[dtype]
    elif dtype is not None and dtype not in (*DTYPES.values(), torch.float64):
        raise LoramixError(f"dtype must be one of {', '.join(DTYPES)} (or a torch.dtype), got {dtype}")
    if isinstance(rank, np.integer):  # a numpy integer is the int it holds
        rank = int(rank)
    cls = COMPOSERS.get(method)
    cls.validate(rank)
    every = [coefficients, *(layers or {}).values()]
    unknown = set().union(*every) - {e.name for e in bank.entries}
    if unknown:
        raise LoramixError(f"coefficients name entries not in the bank: {', '.join(sorted(unknown))}")
    for c in every:
        for name, x in c.items():
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.floating, np.integer)) or not finite(x):
                raise LoramixError(f"the coefficient of '{name}' must be a finite number, got {x!r}")
    # plain floats from here on: a numpy scalar would carry its own precision into the products
    coefficients = {name: float(x) for name, x in coefficients.items()}
    layers = {int(k): {name: float(x) for name, x in c.items()} for k, c in layers.items()} if layers is not None else None
    every = [coefficients, *(layers or {}).values()]
    active = [e for e in bank.entries if any(c.get(e.name, 0.0) != 0.0 for c in every)]
    if not active and not allow_zero:
        raise LoramixError("every coefficient is zero: nothing to compose")
    composer = cls()
    composer.check(bank.entries)
    refs = {m: next(e.adapter.modules[m] for e in bank.entries if m in e.adapter.modules) for m in sorted(bank.shapes)}
    shape = composer.shape(refs, active, rank, bank.max_rank)
    config = _config_for(bank, shape.ranks, shape.scales)
    return Plan(composer, dict(coefficients), active, refs, shape.target, shape.ranks, shape.scales, shape.rank,
                dtype or bank.dtype, config, layers)


def _config_for(bank: Bank, ranks: dict[str, int], scales: dict[str, float]) -> dict:
    """adapter_config.json giving each module its rank and scale: the most common (rank, scale) as r and
    lora_alpha = scale * r, the others through rank_pattern / alpha_pattern keyed by the escaped module name."""
    r, scale = Counter((ranks[m], scales[m]) for m in ranks).most_common(1)[0][0]
    rank_pattern, alpha_pattern = {}, {}
    for m in ranks:
        if (ranks[m], scales[m]) != (r, scale):
            key = "^" + m.replace(".", r"\.")
            rank_pattern[key] = ranks[m]
            alpha_pattern[key] = _number(scales[m] * ranks[m])
    cfg = bank.config
    out = lora_config(
        base_model=bank.base_model,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        r=r,
        lora_alpha=_number(scale * r),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=cfg.get("task_type") or "CAUSAL_LM",
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        layers_to_transform=cfg.get("layers_to_transform"),
        layers_pattern=cfg.get("layers_pattern"),
    )
    # a module the short names miss under layers_to_transform (an entry named it in full) is named in full too
    out["target_modules"] += sorted(m for m in ranks if not applied_by_peft(out, m, "the composed adapter"))
    return out


def _number(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x
