"""The Gram matrix of bank entries' updates, G[i, j] = <W_i, W_j>: what the `neural` operator fits its coefficients
to (operators.Neural), in the space a composition method declares (Composer.operator_space)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..arguments import checked
from ..bank import Bank, BankEntry
from ..errors import LoramixError
from ..progress import track


@checked
def gram_matrix(bank: Bank, entries: Sequence[BankEntry], space: str = "updates") -> np.ndarray:
    """G[i, j] = <W_i, W_j> over all modules, float64 [n, n]. space='params': W is the flattened lora_A and
    lora_B tensors (the paper's); 'updates': W is the updates s B A (computed from r x r products)."""
    import torch

    if space not in ("params", "updates"):
        raise LoramixError(f"unknown gram space '{space}'; use 'params' or 'updates'")
    n = len(entries)
    gram = np.zeros((n, n))
    for module in track(sorted(bank.shapes), f"gram matrix ({space})", total=len(bank.shapes)):
        rows = [(i, e) for i, e in enumerate(entries) if module in e.adapter.modules]
        if not rows:
            continue
        factors = [e.adapter.factors(module) for _, e in rows]
        for (_, e), (a, b) in zip(rows, factors):  # a NaN would make the whole matrix NaN, silently
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise LoramixError(f"{e.name}: module '{module}' has NaN or Inf weights")
        idx = [i for i, _ in rows]
        if space == "params":
            flat = torch.stack([torch.cat([a.double().flatten(), b.double().flatten()]) for a, b in factors])
            gram[np.ix_(idx, idx)] += (flat @ flat.T).numpy()
        else:
            a_all = torch.cat([a.double() for a, _ in factors])  # [R, in]
            b_all = torch.cat([e.adapter.modules[module].scale * b.double() for (_, b), (_, e) in zip(factors, rows)], dim=1)
            inner = (a_all @ a_all.T) * (b_all.T @ b_all)  # [R, R]: <b_p a_p, b_q a_q> for rank-1 pieces p, q
            owner = torch.zeros(a_all.shape[0], len(rows), dtype=torch.float64)
            start = 0
            for col, (a, _) in enumerate(factors):
                owner[start : start + a.shape[0], col] = 1.0
                start += a.shape[0]
            gram[np.ix_(idx, idx)] += (owner.T @ inner @ owner).numpy()
    return gram
