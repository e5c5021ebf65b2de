"""`exact`: the weighted sum of updates, sum_i c_i s_i B_i A_i, which equals [c_1 s_1 B_1 ... c_n s_n B_n] @
[A_1; ...; A_n] (rank R = sum r_i). Orthonormal bases of both stacked factors (from each entry's QR and the
R x R Gram matrices of the stacks) and an SVD of the small R x R core give its best rank-k approximation
(Eckart-Young) in O((d_in + d_out) R^2), never a dense d_out x d_in matrix."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

from ..adapter import LoraModule
from ..bank import BankEntry
from ..errors import LoramixError, setting
from ..threads import one_thread_ops, threaded_map
from .base import COMPOSERS, Composer, ModuleResult, Rank, Shape, Term, Workspace, _finite, stacked_ranks

log = logging.getLogger("loramix")
T = TypeVar("T")


EXACT_MAX_STACKED_RANK = 1024  # QR + SVD costs O((d_in + d_out) R^2): beyond this R, a randomized range finder
EXACT_FLOAT64_MAX_ELEMENTS = 1 << 20  # stacks up to (d_in + d_out) * R elements are factorised in float64


@COMPOSERS.register("exact")
class Exact(Composer):
    """sum_i w_i B_i A_i, truncated to rank k by SVD (k=None keeps every singular value). Output scale is 1,
    with sqrt of the singular values on each factor; ranks below k are padded with zeros. Beyond a stacked
    rank of EXACT_MAX_STACKED_RANK the truncation is computed by a randomized range finder."""

    name = "exact"

    def shape(self, refs: dict[str, LoraModule], active: Sequence[BankEntry], rank: Rank, max_rank: int) -> Shape:
        """Every module at one width: `rank` (default the bank's largest), or for 'full' the largest stacked rank
        (capped by the module's sides); scale 1. A `rank` above the largest min(in, out) of the modules (the most
        singular values any module has) is clamped to it, with a warning, before anything is allocated."""
        if rank == "full":
            target = None
            stacked = stacked_ranks(active)
            width = max(max(1, min(stacked.get(m, 0), r.in_features, r.out_features)) for m, r in refs.items())
        else:
            target = width = max_rank if rank is None else int(rank)
            most = max((min(r.in_features, r.out_features) for r in refs.values()), default=width)
            if width > most:
                log.warning("rank %s is more than any module has (at most %d: min(in, out) of the largest); "
                            "composing at rank %d", f"{width:,}", most, most)
                target = width = most
        return Shape(target, {m: width for m in refs}, {m: 1.0 for m in refs}, width)

    def serial(self, active: Sequence[BankEntry], target: int | None) -> bool:
        """Beyond EXACT_MAX_STACKED_RANK the randomized range finder works on all of a module's factors at once."""
        return target is not None and max(stacked_ranks(active).values(), default=0) > EXACT_MAX_STACKED_RANK

    def mix(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        return ((x @ a.T) * w) @ b.T

    def module(self, terms: list[Term], ref: LoraModule, rank: int | None) -> ModuleResult:
        out_f, in_f = ref.out_features, ref.in_features
        if not terms:
            k = rank or 1
            return ModuleResult(torch.zeros(k, in_f, dtype=torch.float64), torch.zeros(out_f, k, dtype=torch.float64), 1.0)
        stacked = sum(t.factors.rank for t in terms)
        if rank is not None and stacked > EXACT_MAX_STACKED_RANK:
            return self._randomized(terms, ref, rank, self.workspace or Workspace())
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
        if not bool(torch.isfinite(core).all()):  # finite factors, a coefficient too large for `work`
            if work == torch.float32:
                return None  # retried in float64
            raise LoramixError(f"module '{ref.name}': the weighted sum of the entries' updates overflows float64 "
                               f"(a coefficient or {setting('scale')} too large)")

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
    def _randomized(terms: list[Term], ref: LoraModule, rank: int, workspace: Workspace) -> ModuleResult:
        """Rank-k truncation of M = B_stack W A_stack for a large stacked rank R (W [R] each rank-1 piece's
        coefficient * scale): a randomized range finder (Halko, Martinsson & Tropp 2011) with k + 16 seeded probes
        and 2 power iterations, then the SVD of Q^T M for the found range Q [out, k + 16]. M is only applied, never
        formed: O((d_in + d_out) R k) time. The factors are read straight into float32 stacks A_stack [R, in] and
        B_stack^T [R, out] (in `workspace`: no fresh memory per module). The first applications of M run on copies of
        the stacks in `_range_dtype()` (bfloat16 where the CPU multiplies it natively); the last application and Q^T M
        run in float32, so bfloat16's tilt of the range is damped by s_k+1 / s_k (alone it left the residual 19 % above
        Eckart-Young's on a steep spectrum; with them 4e-7 above).
        Products run in _PARTS fixed parts on threads with single-threaded ops, the factorisations on one thread: the
        bytes do not depend on the thread count. The stacks are not checked finite: the first application of M
        touches every weight, and a NaN or Inf among them leaves a NaN or Inf in its result (then each entry is
        checked, to name it). The retained energy would need O(R^2 d) work and is not computed (None)."""
        work, workers = _range_dtype(), torch.get_num_threads()
        out_f, in_f = ref.out_features, ref.in_features
        width = min(rank + 16, in_f, out_f)
        starts = [0]
        for t in terms:
            starts.append(starts[-1] + t.factors.rank)
        size = starts[-1]
        # multi-threaded MKL / oneDNN products and QR change their last bits with the count: one thread each
        with one_thread_ops(), ThreadPoolExecutor(workers, thread_name_prefix="loramix") as pool:
            a32 = workspace.take("a", (size, in_f), torch.float32)  # A_stack [R, in]
            bt32 = workspace.take("bt", (size, out_f), torch.float32)  # B_stack^T [R, out]
            a_work, bt_work = a32, bt32
            if work != torch.float32:
                a_work = workspace.take("a_work", (size, in_f), work)
                bt_work = workspace.take("bt_work", (size, out_f), work)

            def read(part: slice) -> None:  # the entries of `part` into their rows of the stacks, then converted
                for i in range(len(terms))[part]:
                    terms[i].factors.into(a32[starts[i] : starts[i + 1]], bt32[starts[i] : starts[i + 1]].T)
                if work != torch.float32:
                    rows = slice(starts[part.start], starts[part.stop])
                    a_work[rows].copy_(a32[rows])
                    bt_work[rows].copy_(bt32[rows])

            _parts(read, len(terms), workers, pool)
            w = torch.tensor([t.coefficient * t.scale for t in terms]).repeat_interleave(torch.tensor(starts).diff())  # [R]

            def rows(stack: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # stack [n, K] @ x [K, p] -> [n, p]
                return torch.cat(_parts(lambda part: stack[part] @ x, len(stack), workers, pool))

            def times(xt: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:  # xt [p, n] @ stack [n, K] -> [p, K]
                xt = xt.contiguous()  # the stack's rows in parts, the partial products summed in a fixed order
                partial = _parts(lambda part: (xt[:, part] @ stack[part]).float(), len(stack), workers, pool)
                for later in partial[1:]:
                    partial[0] += later
                return partial[0]

            def apply(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:  # M x: [in, p] -> [out, p]
                return times((w[:, None] * rows(a, x.to(a.dtype)).float()).T.to(a.dtype), bt).T

            def apply_t(y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:  # y^T M: [out, p] -> [p, in]
                return times((rows(bt, y.to(a.dtype)).float() * w[:, None]).T.to(a.dtype), a)

            y = apply(torch.randn(in_f, width, generator=torch.Generator().manual_seed(0)), a_work, bt_work)  # seeded probes
            if not _finite(y):
                raise _nonfinite(terms, a32, bt32, starts, ref)
            for i in range(2):  # power iterations sharpen the range towards the top singular vectors
                x = torch.linalg.qr(apply_t(torch.linalg.qr(y)[0], a_work, bt_work).T)[0]
                y = apply(x, a_work, bt_work) if i == 0 else apply(x, a32, bt32)  # the last in float32
            q, _ = torch.linalg.qr(y)  # [out, width]
            projected = apply_t(q, a32, bt32)  # Q^T M [width, in], float32
            u, s, vh = torch.linalg.svd(projected, full_matrices=False)
            kept = min(rank, len(s))
            root = s[:kept].sqrt()
            b = torch.zeros(out_f, rank, dtype=torch.float64)
            a = torch.zeros(rank, in_f, dtype=torch.float64)
            b[:, :kept] = ((q @ u[:, :kept]) * root).double()
            a[:kept] = (root[:, None] * vh[:kept]).double()
        return ModuleResult(a, b, 1.0, None, s.tolist())


_PARTS = 4  # the randomized range finder's work is cut in this many parts, whatever the thread count


def _parts(fn: Callable[[slice], T], n: int, workers: int, pool: ThreadPoolExecutor) -> list[T]:
    """[fn(part) for the _PARTS slices of range(n)], on the `workers` threads of `pool` with single-threaded ops: the
    parts, hence every reduction inside fn, depend on n alone."""
    size = -(-n // _PARTS)
    return list(threaded_map(fn, [slice(i, min(i + size, n)) for i in range(0, n, size)], workers, pool))


def _range_dtype() -> torch.dtype:
    """The dtype the randomized range finder multiplies its stacks in: bfloat16 where oneDNN runs it natively
    (AMX or AVX512-BF16: a [8000, 4096] stack times 32 columns ~8x faster than in float32 here, speed-floors.md),
    float32 elsewhere (emulated bfloat16 is slower)."""
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):  # a torch without the check
        return torch.float32


def _nonfinite(terms: list[Term], a: torch.Tensor, bt: torch.Tensor, starts: list[int], ref: LoraModule) -> LoramixError:
    """The error for stacks a [R, in], bt [R, out] whose product is not finite: the first entry with a NaN or Inf
    weight, else an overflow."""
    for i, t in enumerate(terms):
        if not (_finite(a[starts[i] : starts[i + 1]]) and _finite(bt[starts[i] : starts[i + 1]])):
            return t.factors.nonfinite()
    return LoramixError(f"module '{ref.name}': the weighted sum of the entries' updates overflows float32")


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
