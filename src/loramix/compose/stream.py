"""The one streaming executor: N plans composed in one pass over the bank's tensors, module by module. Each
module's factors are read once (for every entry some plan uses) and shared by the plans (a randomized range finder
reads them straight into its own stacks instead); units of work (a plan's module) run in parallel threads with
single-threaded ops, so the bytes do not depend on the thread count.
`generate` is the N = 1 case (modules in parallel), leave-one-out the N = every entry case (outputs in parallel)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..adapter import CONFIG_FILE, TENSOR_PREFIX, WEIGHTS_FILE, SafetensorsWriter, cast_factors
from ..arguments import checked
from ..bank import Bank
from ..errors import LoramixError, setting
from ..progress import track
from ..threads import threaded_map
from .base import LoraFactors, ModuleResult, Workspace
from .plan import Plan, plan


@dataclass
class Composition:
    """A composed adapter: its adapter_config.json, output rank (None: the entries' own, 'paper'), retained
    energy per module, and the factors per module when composed in memory (empty when streamed to disk)."""

    config: dict
    rank: int | None
    energy: dict[str, float | None] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def mean_energy(self) -> float | None:
        """Mean retained energy over the modules where it was computed (None if nowhere)."""
        known = [e for e in self.energy.values() if e is not None]
        return float(np.mean(known)) if known else None

    @property
    def min_energy(self) -> float | None:
        known = [e for e in self.energy.values() if e is not None]
        return float(min(known)) if known else None


def _module(p: Plan, module: str, factors: dict[str, LoraFactors]) -> ModuleResult:
    """One output module of plan `p`: composed, padded to the planned rank, cast to the output dtype, its factors
    checked finite and not underflowing in it, and its update scale * B @ A checked within the dtype's range (what a
    merge in it would hold)."""
    r = p.composer.module(p.terms(module, factors), p.refs[module], p.target)
    pad = p.ranks[module] - r.a.shape[0]
    if pad:
        r.a = torch.cat([r.a, r.a.new_zeros(pad, r.a.shape[1])])
        r.b = torch.cat([r.b, r.b.new_zeros(r.b.shape[0], pad)], dim=1)
    r.a, r.b = cast_factors(module, r.a, r.b, p.scales[module], p.dtype, setting("dtype"))
    return r


def stream(bank: Bank, plans: Sequence[Plan], description: str = "composing") -> Iterator[tuple[int, str, ModuleResult]]:
    """(plan index, module, result) for every module (sorted) and plan, in that order. Plans whose composer
    needs it (Composer.serial) make the pass run one unit at a time with multi-threaded ops, reusing one workspace."""
    modules = sorted(bank.shapes)
    used = {e.name for p in plans for e in p.active}
    needed = [e for e in bank.entries if e.name in used]
    serial = any(p.serial for p in plans)

    def units() -> Iterator[tuple[int, str, dict[str, LoraFactors]]]:
        for m in modules:
            # each entry's factors are read by the first unit that uses them, in its thread, then shared
            factors = {e.name: LoraFactors.stored(e, m) for e in needed if m in e.adapter.modules}
            for i in range(len(plans)):
                yield i, m, factors

    def one(unit: tuple[int, str, dict[str, LoraFactors]]) -> tuple[int, str, ModuleResult]:
        i, m, factors = unit
        return i, m, _module(plans[i], m, factors)

    if not serial:
        yield from track(threaded_map(one, units()), description, total=len(modules) * len(plans))
        return
    workspace = Workspace()  # lent to the plans' composers while the units run one at a time
    for p in plans:
        p.composer.workspace = workspace
    try:
        yield from track(map(one, units()), description, total=len(modules) * len(plans))
    finally:
        for p in plans:
            p.composer.workspace = None


def write_compositions(folders: Sequence[Path], bank: Bank, plans: Sequence[Plan], description: str = "composing") -> list[Composition]:
    """Write plan i into folders[i], created if missing (adapter_model.safetensors streamed module by module,
    adapter_config.json): memory holds the modules in flight, never a whole output."""
    out = [Composition(p.config, p.rank) for p in plans]
    read = [bank.path.resolve(), *(e.adapter.path.resolve() for e in bank.entries)]
    for folder in folders:
        where = Path(folder).resolve()
        if any(where.is_relative_to(r) for r in read):
            raise LoramixError(f"{folder}: lies inside bank {bank.path}, which this composition reads; write it elsewhere")
    for folder in folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        writers = [stack.enter_context(SafetensorsWriter(Path(f) / WEIGHTS_FILE, p.tensor_specs())) for f, p in zip(folders, plans)]
        for i, module, r in stream(bank, plans, description):
            writers[i].write(f"{TENSOR_PREFIX}{module}.lora_A.weight", r.a)
            writers[i].write(f"{TENSOR_PREFIX}{module}.lora_B.weight", r.b)
            out[i].energy[module] = r.energy
    for folder, p in zip(folders, plans):
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(p.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


@checked
def write_composition(folder: str | Path, bank: Bank, coefficients: dict[str, Any], **kwargs: Any) -> Composition:
    """Compose the bank's adapters with `coefficients` and stream the result into FOLDER. Keyword arguments as
    `plan` (method, rank, dtype)."""
    p = plan(bank, coefficients, **kwargs)
    return write_compositions([Path(folder)], bank, [p], f"composing ({p.composer.name})")[0]


@checked
def compose(bank: Bank, coefficients: dict[str, Any], **kwargs: Any) -> Composition:
    """Compose the bank's adapters with `coefficients` (entry name -> weight; missing names weigh 0) in memory.
    Keyword arguments as `plan` (method, rank, dtype)."""
    p = plan(bank, coefficients, **kwargs)
    out = Composition(p.config, p.rank)
    for _, module, r in stream(bank, [p], f"composing ({p.composer.name})"):
        out.factors[module] = (r.a, r.b)
        out.energy[module] = r.energy
    return out
