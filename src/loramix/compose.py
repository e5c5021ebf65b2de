"""Stage 5: composition. Bank adapters and their coefficients become one new adapter, module by module
(tensors read lazily per module, so memory holds one module's factors at a time plus the output).

`exact`: the weighted sum of updates, sum_i c_i s_i B_i A_i, which equals [c_1 s_1 B_1 ... c_n s_n B_n] @
[A_1; ...; A_n] (rank R = sum r_i). Orthonormal bases of both stacked factors (from each entry's QR and the
R x R Gram matrices of the stacks) and an SVD of the small R x R core give its best rank-k approximation
(Eckart-Young) in O((d_in + d_out) R^2), never a dense d_out x d_in matrix.
`paper`: A and B averaged separately with the coefficients (the paper's C @ W); equal ranks and scales required.

Modules (and leave-one-out outputs) are composed in parallel threads, each torch op on one thread: the
result does not depend on the number of threads."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .adapter import CONFIG_FILE, TENSOR_PREFIX, WEIGHTS_FILE, LoraModule, SafetensorsWriter, lora_config
from .bank import Bank, BankEntry
from .errors import LoramixError
from .progress import track
from .registry import Registry
from .threads import threaded_map


class LoraFactors:
    """One entry's factors of one module as stored, A [r, in] and B [out, r], checked finite. Their thin QR
    factorisations are computed on first use and kept, so outputs sharing an entry (leave-one-out) factorise it once."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b
        self._qr: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}
        self._lock = threading.Lock()  # outputs composed in parallel share it

    @classmethod
    def read(cls, entry: BankEntry, module: str) -> "LoraFactors":
        a, b = entry.adapter.factors(module)
        if not (_finite(a) and _finite(b)):
            raise LoramixError(f"{entry.name}: module '{module}' has NaN or Inf weights")
        return cls(a, b)

    def qr(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(Q_a^T [r', in], R_a [r', r], Q_b^T [r'', out], R_b [r'', r]) with A^T = Q_a R_a and B = Q_b R_b, in
        `dtype`; the Q factors transposed (contiguous rows), so that stacking them is a plain copy."""
        with self._lock:
            if dtype not in self._qr:
                q_a, r_a = torch.linalg.qr(self.a.to(dtype).T)
                q_b, r_b = torch.linalg.qr(self.b.to(dtype))
                self._qr[dtype] = (q_a.T.contiguous(), r_a, q_b.T.contiguous(), r_b)
            return self._qr[dtype]


@dataclass
class Term:
    """One entry's contribution to a module: coefficient * scale * B @ A (scale: the entry's PEFT scaling)."""

    factors: LoraFactors
    coefficient: float
    scale: float


@dataclass
class ModuleResult:
    """A composed module: delta_W = scale * B @ A, with the fraction of the exact update's energy it keeps."""

    a: torch.Tensor  # [k, in]
    b: torch.Tensor  # [out, k]
    scale: float
    energy: float | None = 1.0  # |truncated|_F^2 / |exact|_F^2; None when not computed (randomized)
    singular_values: list[float] = field(default_factory=list)


class Composer:
    """Combines a module's terms; `check` refuses banks the method cannot compose correctly."""

    def check(self, entries: Sequence[BankEntry], rank: int | str | None) -> None:
        """Raise LoramixError if these entries cannot be composed correctly at this rank."""

    def module(self, terms: list[Term], ref: LoraModule, rank: int | None) -> ModuleResult:
        """Compose one module from its terms; `ref` is the module as one bank entry has it (shape, rank, scale)."""
        raise NotImplementedError


COMPOSERS: Registry[type[Composer]] = Registry("composition")


EXACT_MAX_STACKED_RANK = 1024  # QR + SVD costs O((d_in + d_out) R^2): beyond this R, a randomized range finder
EXACT_FLOAT64_MAX_ELEMENTS = 1 << 20  # stacks up to (d_in + d_out) * R elements are factorised in float64


@COMPOSERS.register("exact")
class Exact(Composer):
    """sum_i w_i B_i A_i, truncated to rank k by SVD (k=None keeps every singular value). Output scale is 1,
    with sqrt of the singular values on each factor; ranks below k are padded with zeros. Beyond a stacked
    rank of EXACT_MAX_STACKED_RANK the truncation is computed by a randomized range finder."""

    def module(self, terms: list[Term], ref: LoraModule, rank: int | None) -> ModuleResult:
        out_f, in_f = ref.out_features, ref.in_features
        if not terms:
            k = rank or 1
            return ModuleResult(torch.zeros(k, in_f, dtype=torch.float64), torch.zeros(out_f, k, dtype=torch.float64), 1.0)
        stacked = sum(t.factors.a.shape[0] for t in terms)
        if rank is not None and stacked > EXACT_MAX_STACKED_RANK:
            return self._randomized(terms, ref, rank)
        # float64 while the stacks are small (tiny cost, ~1e-12 error); float32 beyond (~1e-6, half the time)
        # unless the entries' subspaces nearly coincide, where the Gram matrices need float64 and an eigendecomposition
        small = (in_f + out_f) * stacked <= EXACT_FLOAT64_MAX_ELEMENTS
        return self._factorised(terms, ref, rank, torch.float64 if small else torch.float32) or self._factorised(
            terms, ref, rank, torch.float64
        )

    @staticmethod
    def _factorised(terms: list[Term], ref: LoraModule, rank: int | None, work: torch.dtype) -> ModuleResult | None:
        """With each entry's QR (A_i^T = Q_ai R_ai, B_i = Q_bi R_bi), the sum is Q_b K Q_a^T, Q the entries' Q
        factors side by side [d, R] and K the block-diagonal [R, R] of w_i R_bi R_ai^T. Each Q's range gets an
        orthonormal basis U = Q T (Q = U P) from the R x R Gram matrix Q^T Q, and the SVD of the core P_b K P_a^T
        gives the truncation: two GEMMs and three R x R factorisations per output instead of two Householder QRs
        of the stacks. None if a float32 Gram matrix is too ill-conditioned (the caller retries in float64)."""
        qrs = [t.factors.qr(work) for t in terms]
        qt_a = torch.cat([f[0] for f in qrs])  # Q_a^T [R, in]
        qt_b = torch.cat([f[2] for f in qrs])  # Q_b^T [R, out]
        core = torch.block_diag(*[(t.coefficient * t.scale) * (r_b @ r_a.T) for t, (_, r_a, _, r_b) in zip(terms, qrs)])
        def basis(qt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            return _cholesky_basis(qt, len(terms)) if work == torch.float32 else _eigen_basis(qt)

        if (on_b := basis(qt_b)) is None or (on_a := basis(qt_a)) is None:
            return None
        (t_b, p_b), (t_a, p_a) = on_b, on_a
        u, s, vh = torch.linalg.svd(p_b @ core @ p_a.T)  # core [m_b, m_a]
        k = len(s) if rank is None else rank
        kept = min(k, len(s))
        root = s[:kept].sqrt()
        b = torch.zeros(ref.out_features, k, dtype=torch.float64)
        a = torch.zeros(k, ref.in_features, dtype=torch.float64)
        b[:, :kept] = (qt_b.T @ (t_b @ u[:, :kept]) * root).double()
        a[:kept] = ((root[:, None] * (vh[:kept] @ t_a.T)) @ qt_a).double()
        s = s.double()
        total = float((s**2).sum())
        energy = float((s[:kept] ** 2).sum()) / total if total > 0 else 1.0
        return ModuleResult(a, b, 1.0, energy, s.tolist())

    @staticmethod
    def _randomized(terms: list[Term], ref: LoraModule, rank: int) -> ModuleResult:
        """Rank-k truncation of M = B_stack @ A_stack for a large stacked rank R: a randomized range finder
        (Halko, Martinsson & Tropp 2011) with k + 16 seeded probes and 2 power iterations, in float32. M is
        only applied, never formed: O((d_in + d_out) R k) time, O((d_in + d_out) R) memory. The retained
        energy would need O(R^2 d) work and is not computed (None)."""
        b_stack = torch.cat([(t.coefficient * t.scale) * t.factors.b.float() for t in terms], dim=1)  # [out, R]
        a_stack = torch.cat([t.factors.a.float() for t in terms], dim=0)  # [R, in]
        width = min(rank + 16, ref.in_features, ref.out_features)
        probes = torch.randn(ref.in_features, width, generator=torch.Generator().manual_seed(0))
        y = b_stack @ (a_stack @ probes)
        for _ in range(2):  # power iterations sharpen the range towards the top singular vectors
            q, _ = torch.linalg.qr(a_stack.T @ (b_stack.T @ torch.linalg.qr(y)[0]))
            y = b_stack @ (a_stack @ q)
        q, _ = torch.linalg.qr(y)  # [out, width]
        u, s, vh = torch.linalg.svd((q.T @ b_stack) @ a_stack, full_matrices=False)
        kept = min(rank, len(s))
        root = s[:kept].sqrt()
        b = torch.zeros(ref.out_features, rank, dtype=torch.float64)
        a = torch.zeros(rank, ref.in_features, dtype=torch.float64)
        b[:, :kept] = ((q @ u[:, :kept]) * root).double()
        a[:kept] = (root[:, None] * vh[:kept]).double()
        return ModuleResult(a, b, 1.0, None, s.tolist())


@COMPOSERS.register("paper")
class Paper(Composer):
    """The paper's code: A = sum_i c_i A_i and B = sum_i c_i B_i, keeping the entries' common rank and scale.
    This is not the weighted sum of updates: it adds cross terms c_i c_j B_i A_j."""

    def check(self, entries: Sequence[BankEntry], rank: int | str | None) -> None:
        if rank is not None:
            raise LoramixError("composition 'paper' keeps the entries' rank; --rank applies to 'exact' only")
        first: dict[str, tuple[int, float]] = {}
        for e in entries:
            for name, m in e.adapter.modules.items():
                ref = first.setdefault(name, (m.rank, m.scale))
                if (m.rank, m.scale) != ref:
                    raise LoramixError(
                        f"{e.name}: module '{name}' has rank {m.rank} and scale {m.scale:g}, another entry rank {ref[0]} and "
                        f"scale {ref[1]:g}: composition 'paper' needs equal ranks and scales (use 'exact')"
                    )

    def module(self, terms: list[Term], ref: LoraModule, rank: int | None) -> ModuleResult:
        a = torch.zeros(ref.rank, ref.in_features, dtype=torch.float64)
        b = torch.zeros(ref.out_features, ref.rank, dtype=torch.float64)
        for t in terms:
            a += t.coefficient * t.factors.a.double()
            b += t.coefficient * t.factors.b.double()
        return ModuleResult(a, b, ref.scale)


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


@dataclass
class Plan:
    """Everything a composition writes that is known before any tensor is read: the entries with non-zero
    coefficients, the rank and scale of every output module, the output dtype and adapter_config.json."""

    method: str
    coefficients: dict[str, float]
    active: list[BankEntry]
    target_rank: int | None  # exact: truncate to this rank; None keeps every singular value
    ranks: dict[str, int]
    scales: dict[str, float]
    dtype: torch.dtype
    config: dict

    @property
    def rank(self) -> int | None:
        return None if self.method == "paper" else max(self.ranks.values())

    @property
    def randomized(self) -> bool:
        """Whether some module is truncated by the randomized range finder (a stacked rank beyond
        EXACT_MAX_STACKED_RANK): memory-bound work on all of a module's factors, run one module at a time with
        multi-threaded ops. Every other composition runs per module (per output) on one thread, see threaded_map."""
        if self.method != "exact" or self.target_rank is None:
            return False
        return max(_stacked_ranks(self.active).values()) > EXACT_MAX_STACKED_RANK


def _stacked_ranks(entries: Sequence[BankEntry]) -> dict[str, int]:
    """Module -> the sum of the entries' ranks there (the stacked rank R of an exact composition)."""
    stacked: Counter = Counter()
    for e in entries:
        for name, m in e.adapter.modules.items():
            stacked[name] += m.rank
    return dict(stacked)


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
    return lora_config(
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


def _number(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def plan(
    bank: Bank,
    coefficients: dict[str, float],
    *,
    method: str = "exact",
    rank: int | str | None = None,
    dtype: torch.dtype | None = None,
) -> Plan:
    """Check the request and fix the output's shape. `rank`: an int truncates (exact) to that rank; None is the
    bank's largest rank; 'full' keeps every singular value (all modules padded to one rank)."""
    composer = COMPOSERS.get(method)()
    unknown = set(coefficients) - {e.name for e in bank.entries}
    if unknown:
        raise LoramixError(f"coefficients name entries not in the bank: {', '.join(sorted(unknown))}")
    active = [e for e in bank.entries if coefficients.get(e.name, 0.0) != 0.0]
    if not active:
        raise LoramixError("every coefficient is zero: nothing to compose")
    composer.check(bank.entries, rank)
    refs = {m: next(e.adapter.modules[m] for e in bank.entries if m in e.adapter.modules) for m in sorted(bank.shapes)}
    if method == "paper":
        target, ranks, scales = None, {m: r.rank for m, r in refs.items()}, {m: r.scale for m, r in refs.items()}
    else:
        if rank == "full":
            target = None
            stacked = _stacked_ranks(active)
            width = max(max(1, min(stacked.get(m, 0), r.in_features, r.out_features)) for m, r in refs.items())
        else:
            target = bank.max_rank if rank is None else int(rank)
            if target < 1:
                raise LoramixError(f"rank must be at least 1 or 'full', got {rank}")
            width = target
        ranks, scales = {m: width for m in refs}, {m: 1.0 for m in refs}
    return Plan(method, dict(coefficients), active, target, ranks, scales, dtype or bank.dtype, _config_for(bank, ranks, scales))


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: its min and max in one pass (NaN propagates), without a boolean copy of `t`."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _eigen_basis(qt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T [R, m], P [m, R]) such that U = Q T has orthonormal columns spanning the range of Q = qt^T [d, R] and
    Q = U P, from the eigendecomposition of the Gram matrix Q^T Q; directions below 1e-12 of its largest eigenvalue
    (rank deficiency, rounding) are dropped: they carry at most 1e-6 of Q's norm. For float64 Q."""
    lam, v = torch.linalg.eigh(qt @ qt.T)
    keep = lam > 1e-12 * lam[-1]
    root = lam[keep].sqrt()
    return v[:, keep] / root, root[:, None] * v[:, keep].T


def _cholesky_basis(qt: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """As `_eigen_basis`, for a float32 Q made of `blocks` blocks of orthonormal columns, from the Cholesky factor
    Q^T Q = L L^T (T = L^-T, P = L^T): a tenth of the eigendecomposition's time. None unless the Gram matrix is
    safely conditioned for float32: its largest eigenvalue is at most `blocks` (a sum of that many projections),
    its smallest is 1 / |L^-1|_2^2, estimated by power iteration, and their ratio must stay below 1e3."""
    l, info = torch.linalg.cholesky_ex(qt @ qt.T)
    if info:
        return None
    inv = torch.linalg.solve_triangular(l, torch.eye(len(l), dtype=l.dtype), upper=False)  # L^-1
    v = torch.linspace(1.0, 2.0, len(l), dtype=l.dtype)
    for _ in range(8):  # v -> G^-1 v = L^-T L^-1 v
        v = inv.T @ (inv @ v)
        v = v / v.norm()
    if not blocks * float((inv @ v).norm()) ** 2 <= 1e3:
        return None
    return inv.T, l.T


def compose_module(bank: Bank, p: Plan, module: str, read: Callable[[BankEntry], LoraFactors]) -> ModuleResult:
    """One output module of plan `p`, `read(entry)` giving an entry's factors for this module; padded to the
    planned rank, cast to the output dtype and checked to be finite."""
    terms = []
    for e in p.active:
        spec = e.adapter.modules.get(module)
        if spec is not None:
            terms.append(Term(read(e), p.coefficients[e.name], spec.scale))
    ref = next(e.adapter.modules[module] for e in bank.entries if module in e.adapter.modules)
    r = COMPOSERS.get(p.method)().module(terms, ref, p.target_rank)
    pad = p.ranks[module] - r.a.shape[0]
    if pad:
        r.a = torch.cat([r.a, r.a.new_zeros(pad, r.a.shape[1])])
        r.b = torch.cat([r.b, r.b.new_zeros(r.b.shape[0], pad)], dim=1)
    r.a, r.b = r.a.to(p.dtype), r.b.to(p.dtype)
    if not (_finite(r.a) and _finite(r.b)):
        raise LoramixError(f"module '{module}': the composed update overflows {p.dtype} (choose another --dtype)")
    return r


def composed_modules(bank: Bank, p: Plan) -> Iterator[tuple[str, ModuleResult]]:
    """Compose module by module, reading each entry's factors only for the module at hand."""
    modules = sorted(bank.shapes)

    def one(module: str) -> ModuleResult:
        return compose_module(bank, p, module, lambda e: LoraFactors.read(e, module))

    results = map(one, modules) if p.randomized else threaded_map(one, modules)
    yield from zip(modules, track(results, f"composing ({p.method})", total=len(modules)))


def tensor_specs(bank: Bank, p: Plan) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
    """Name -> (dtype, shape) of every tensor of plan `p`'s output file."""
    specs = {}
    for m, (out_f, in_f) in bank.shapes.items():
        specs[f"{TENSOR_PREFIX}{m}.lora_A.weight"] = (p.dtype, (p.ranks[m], in_f))
        specs[f"{TENSOR_PREFIX}{m}.lora_B.weight"] = (p.dtype, (out_f, p.ranks[m]))
    return specs


def write_module(writer: SafetensorsWriter, p: Plan, module: str, r: ModuleResult) -> None:
    writer.write(f"{TENSOR_PREFIX}{module}.lora_A.weight", r.a)
    writer.write(f"{TENSOR_PREFIX}{module}.lora_B.weight", r.b)


def write_config(folder: Path, p: Plan) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(p.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def compose(bank: Bank, coefficients: dict[str, float], **kwargs: Any) -> Composition:
    """Compose the bank's adapters with `coefficients` (entry name -> weight; missing names weigh 0) in memory.
    Keyword arguments as `plan` (method, rank, dtype)."""
    p = plan(bank, coefficients, **kwargs)
    out = Composition(p.config, p.rank)
    for module, r in composed_modules(bank, p):
        out.factors[module] = (r.a, r.b)
        out.energy[module] = r.energy
    return out


def write_composition(folder: str | Path, bank: Bank, coefficients: dict[str, float], **kwargs: Any) -> Composition:
    """Compose as `compose` but stream each module into FOLDER/adapter_model.safetensors as it is produced
    (and write adapter_config.json): memory holds one module's factors, never the whole output."""
    p = plan(bank, coefficients, **kwargs)
    out = Composition(p.config, p.rank)
    folder = Path(folder)
    with SafetensorsWriter(folder / WEIGHTS_FILE, tensor_specs(bank, p)) as writer:
        for module, r in composed_modules(bank, p):
            write_module(writer, p, module, r)
            out.energy[module] = r.energy
    write_config(folder, p)
    return out


def gram_matrix(bank: Bank, entries: Sequence[BankEntry], space: str = "updates") -> np.ndarray:
    """G[i, j] = <W_i, W_j> over all modules, float64 [n, n]. space='params': W is the flattened lora_A and
    lora_B tensors (the paper's); 'updates': W is the updates s B A (computed from r x r products)."""
    n = len(entries)
    gram = np.zeros((n, n))
    for module in track(sorted(bank.shapes), f"gram matrix ({space})", total=len(bank.shapes)):
        rows = [(i, e) for i, e in enumerate(entries) if module in e.adapter.modules]
        if not rows:
            continue
        factors = [e.adapter.factors(module) for _, e in rows]
        idx = [i for i, _ in rows]
        if space == "params":
            flat = torch.stack([torch.cat([a.double().flatten(), b.double().flatten()]) for a, b in factors])
            gram[np.ix_(idx, idx)] += (flat @ flat.T).numpy()
        elif space == "updates":
            a_all = torch.cat([a.double() for a, _ in factors])  # [R, in]
            b_all = torch.cat([e.adapter.modules[module].scale * b.double() for (_, b), (_, e) in zip(factors, rows)], dim=1)
            inner = (a_all @ a_all.T) * (b_all.T @ b_all)  # [R, R]: <b_p a_p, b_q a_q> for rank-1 pieces p, q
            owner = torch.zeros(a_all.shape[0], len(rows), dtype=torch.float64)
            start = 0
            for col, (a, _) in enumerate(factors):
                owner[start : start + a.shape[0], col] = 1.0
                start += a.shape[0]
            gram[np.ix_(idx, idx)] += (owner.T @ inner @ owner).numpy()
        else:
            raise LoramixError(f"unknown gram space '{space}'; use 'params' or 'updates'")
    return gram
