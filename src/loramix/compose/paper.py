"""`paper`: A and B averaged separately with the coefficients (the paper's C @ W); equal ranks and scales required."""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapter import LoraModule
from ..bank import BankEntry
from ..errors import LoramixError, setting
from .base import COMPOSERS, Composer, ModuleResult, Rank, Shape, Term


@COMPOSERS.register("paper")
class Paper(Composer):
    """The paper's code: A = sum_i c_i A_i and B = sum_i c_i B_i, keeping the entries' common rank and scale.
    This is not the weighted sum of updates: it adds cross terms c_i c_j B_i A_j. Its trained operator
    reconstructs the flattened A and B tensors (the paper's), and refinement mixes A and B separately (LoraHub's)."""

    name = "paper"
    operator_space = "params"

    @classmethod
    def validate(cls, rank: Rank) -> None:
        if rank is not None:
            raise LoramixError(f"composition 'paper' keeps the entries' rank; {setting('rank')} applies to 'exact' only")

    def check(self, entries: Sequence[BankEntry]) -> None:
        first: dict[str, tuple[int, float]] = {}
        for e in entries:
            for name, m in e.adapter.modules.items():
                ref = first.setdefault(name, (m.rank, m.scale))
                if (m.rank, m.scale) != ref:
                    raise LoramixError(
                        f"{e.name}: module '{name}' has rank {m.rank} and scale {m.scale:g}, another entry rank {ref[0]} and "
                        f"scale {ref[1]:g}: composition 'paper' needs equal ranks and scales (use 'exact')"
                    )

    def shape(self, refs: dict[str, LoraModule], active: Sequence[BankEntry], rank: Rank, max_rank: int) -> Shape:
        return Shape(None, {m: r.rank for m, r in refs.items()}, {m: r.scale for m, r in refs.items()}, None)

    def module(self, terms: list[Term], ref: LoraModule, target: int | None) -> ModuleResult:
        a = torch.zeros(ref.rank, ref.in_features, dtype=torch.float64)
        b = torch.zeros(ref.out_features, ref.rank, dtype=torch.float64)
        for t in terms:
            a += t.coefficient * t.factors.a.double()
            b += t.coefficient * t.factors.b.double()
        return ModuleResult(a, b, ref.scale)

    def mix(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        """(sum_i w_i B_i) (sum_i w_i A_i) x: equal ranks r = R / k, the shared scale already in b."""
        r = a.shape[0] // k
        a_mix = (a * w[:, None]).reshape(k, r, -1).sum(0)
        b_mix = (b * w[None, :]).reshape(b.shape[0], k, r).sum(1)
        return (x @ a_mix.T) @ b_mix.T


