"""Distances between point clouds ([n, d] float arrays): `w2`, `sliced`, `mmd-rbf`, `gaussian-w2`, each computed one
query cloud against a block of references at once (`core.Clouds`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .core import Clouds, Prepared, register_batched, register_distance

_EXACT_OT_MAX = 1_000_000  # n * m up to which W2 uses exact OT; Sinkhorn beyond
_DUPLICATE = 1e-12  # squared distances below this fraction of the largest squared norm are rounding: duplicate points


def _products(queries: Clouds, q: int, refs: Clouds, lo: int, hi: int):
    """(ks, sizes, x, xx, x_extra, y_sq, y_extras, g) per block of references lo <= k < hi: their indices and sizes,
    cloud q of `queries` with its squared norms and extra, the block's squared norms and extras, and x @ y^T
    [n_q, sum of sizes] in one matrix product."""
    x, xx, _, (x_extra,) = queries.block(q, q + 1)
    j = lo
    while j < hi:
        end = refs.end(j, hi)
        y, yy, sizes, extras = refs.block(j, end)
        yield range(j, end), sizes, x, xx, x_extra, yy, extras, x @ y.T
        j = end


def _blocks(queries: Clouds, q: int, refs: Clouds, lo: int, hi: int):
    """(ks, sizes, d2) per block of references: the squared Euclidean distances [n_q, sum of sizes] from cloud q to
    the block's points (as POT's ot.dist: |x|^2 + |y|^2 - 2 x.y, clipped at 0)."""
    for ks, sizes, _, xx, _, yy, _, g in _products(queries, q, refs, lo, hi):
        yield ks, sizes, np.maximum(xx[:, None] + yy[None, :] - 2 * g, 0.0)


def _points(x: np.ndarray) -> Prepared:
    return np.asarray(x, dtype=np.float64), None


@register_batched("w2", _points)
def w2(queries: Clouds, q: int, refs: Clouds, lo: int, hi: int) -> np.ndarray:
    """2-Wasserstein distance between uniform point clouds (Euclidean ground cost): exact OT up to 10^6 point pairs
    (clouds of one size: an optimal assignment, which an optimal plan between uniform measures of equal size is
    (Birkhoff), solved by scipy's linear_sum_assignment, about twice as fast as the network simplex; else POT's
    emd2), entropic OT (Sinkhorn, reg 0.01 of the largest cost) beyond."""
    import ot
    from scipy.optimize import linear_sum_assignment

    out = np.empty(hi - lo)
    for ks, sizes, d2 in _blocks(queries, q, refs, lo, hi):
        for k, cost in zip(ks, np.split(d2, np.cumsum(sizes)[:-1], axis=1)):
            n, m = cost.shape
            if n == m and n * m <= _EXACT_OT_MAX:
                rows, cols = linear_sum_assignment(cost)
                value = cost[rows, cols].mean()
            elif n * m <= _EXACT_OT_MAX:
                value = ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), np.ascontiguousarray(cost), numItermax=10_000_000)
            else:
                scale = float(cost.max()) or 1.0
                value = ot.sinkhorn2(np.full(n, 1 / n), np.full(m, 1 / m), cost / scale, reg=0.01) * scale
            out[k - lo] = np.sqrt(max(float(value), 0.0))
    return out


_PROJECTIONS = 256


def _sliced_matrix(sigs: Sequence[np.ndarray], seed: int) -> np.ndarray | None:
    """All pairs at once when the clouds have one size n: each cloud is projected on POT's seeded directions and
    sorted once; then SW2^2(i, j) = |S_i - S_j|^2 / (n * directions), from one Gram matrix. Same values as `sliced`."""
    import ot

    if len({len(x) for x in sigs}) != 1:
        return None
    dirs = ot.sliced.get_random_projections(sigs[0].shape[1], _PROJECTIONS, seed)
    s = np.stack([np.sort(x.astype(np.float64) @ dirs, axis=0).ravel() for x in sigs])
    sq = (s * s).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * s @ s.T, 0.0) / s.shape[1]
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


@register_distance("sliced", "cloud", matrix=_sliced_matrix)
def sliced(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: W2 of 1-D projections on 256 seeded random directions (POT)."""
    import ot

    return float(ot.sliced_wasserstein_distance(x.astype(np.float64), y.astype(np.float64), n_projections=_PROJECTIONS, p=2, seed=seed))


def _with_within(x: np.ndarray) -> Prepared:
    """The cloud, and its within-cloud squared distances (pairs a < b, 1-D) as `extra`."""
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(1)
    return x, np.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0.0)[np.triu_indices(len(x), 1)]


@register_batched("mmd-rbf", _with_within)
def mmd_rbf(queries: Clouds, q: int, refs: Clouds, lo: int, hi: int) -> np.ndarray:
    """MMD (square root of the biased MMD^2) with a Gaussian kernel exp(-|u - v|^2 / (2 s^2)),
    s^2 the median squared distance between distinct points of the pooled sample (median heuristic; duplicate
    points left out: pairs whose squared distance is within _DUPLICATE of the largest squared norm, the rounding of
    |x|^2 + |y|^2 - 2 x.y). References of one size are computed together, one array per block."""
    out = np.empty(hi - lo)
    for ks, sizes, x, xx, within_x, yy, extras, g in _products(queries, q, refs, lo, hi):
        n = len(x)
        d2 = np.maximum(xx[:, None] + yy[None, :] - 2 * g, 0.0)
        groups = [list(range(len(ks)))] if len(set(sizes.tolist())) == 1 else [[i] for i in range(len(ks))]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for group in groups:
            m = int(sizes[group[0]])
            cross = np.stack([d2[:, starts[i] : starts[i + 1]].ravel() for i in group])  # [B, n m]
            within_y = np.stack([extras[i] for i in group])  # [B, m (m - 1) / 2]
            pooled = np.concatenate([np.broadcast_to(within_x, (len(group), len(within_x))), within_y, cross], axis=1)
            norms = np.array([max(xx.max(initial=0), yy[starts[i] : starts[i + 1]].max(initial=0)) for i in group])
            out[[ks[i] - lo for i in group]] = _mmd_rows(pooled, n, m, len(within_x), within_y.shape[1], _DUPLICATE * norms)
    return out


def _mmd_rows(pooled: np.ndarray, n: int, m: int, lx: int, ly: int, tie: np.ndarray) -> np.ndarray:
    """MMD per row of `pooled` [B, lx + ly + n m]: a pair's within-x, within-y and cross squared distances; those up to
    its `tie` [B] are duplicates."""
    zeros = (pooled <= tie[:, None]).sum(1)
    positive = pooled.shape[1] - zeros
    bandwidth = np.ones(len(pooled))
    for z in np.unique(zeros[positive > 0]):  # rows with as many duplicate pairs share their median's positions
        rows = np.flatnonzero((zeros == z) & (positive > 0))
        p = pooled.shape[1] - int(z)
        mid = sorted({int(z) + (p - 1) // 2, int(z) + p // 2})
        bandwidth[rows] = np.partition(pooled[rows], mid, axis=1)[:, mid].mean(1)
    kernel = np.exp(pooled * (-0.5 / bandwidth)[:, None])
    kxx = (n + 2 * kernel[:, :lx].sum(1)) / (n * n)
    kyy = (m + 2 * kernel[:, lx : lx + ly].sum(1)) / (m * m)
    kxy = kernel[:, lx + ly :].mean(1)
    return np.sqrt(np.maximum(kxx + kyy - 2 * kxy, 0.0))


def _gaussian(x: np.ndarray) -> Prepared:
    """A cloud [n, d] as its Gaussian: a factor F [min(n, d), d] with F^T F its covariance (1/n), and (mean [d], the
    covariance's trace)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    f = (x - mean) / np.sqrt(len(x))
    if len(x) > x.shape[1]:  # fewer rows: the covariance's symmetric square root
        w, v = np.linalg.eigh(f.T @ f)
        f = (v * np.sqrt(np.clip(w, 0.0, None))).T
    return f, (mean, float((f * f).sum()))


@register_batched("gaussian-w2", _gaussian, revision=2)  # 2: no ridge, factor form
def gaussian_w2(queries: Clouds, q: int, refs: Clouds, lo: int, hi: int) -> np.ndarray:
    """Frechet (Bures-Wasserstein) distance between Gaussians fitted to the clouds (means, covariances with
    1/n): sqrt(|m_x - m_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)). The cross term is the nuclear norm of
    F_x F_y^T: the square roots of the eigenvalues of a min(n_x, n_y)-sized Gram matrix, never a d x d square root."""
    out = np.empty(hi - lo)
    for ks, sizes, _, _, (mx, tx), _, extras, g in _products(queries, q, refs, lo, hi):
        parts = np.split(g, np.cumsum(sizes)[:-1], axis=1)  # F_x F_y^T per reference
        grams = [p.T @ p if p.shape[0] >= p.shape[1] else p @ p.T for p in parts]
        eig = np.linalg.eigvalsh(np.stack(grams)) if len({x.shape for x in grams}) == 1 else [np.linalg.eigvalsh(x) for x in grams]
        for k, lam, (my, ty) in zip(ks, eig, extras):
            cross = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
            out[k - lo] = np.sqrt(max(float(((mx - my) ** 2).sum()) + tx + ty - 2 * cross, 0.0))
    return out


# -- rows and matrices -------------------------------------------------------------------------------------
