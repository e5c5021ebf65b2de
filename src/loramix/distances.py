"""Stage 3: distances between two signatures (empirical distributions).

On token-id unigrams (1-D int arrays), the paper's code: `wd`, `kl`, `js`, `mmd` (seeded here).
On point clouds ([n, d] float arrays): `w2`, `sliced`, `mmd-rbf`, `gaussian-w2`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from .errors import LoramixError
from .progress import track
from .registry import Registry

Kind = Literal["tokens", "cloud"]


@dataclass(frozen=True)
class Distance:
    """A registered distance: `fn(x, y, seed) -> float`, for signatures of `kind`; `matrix(sigs, seed)` is an
    optional fast path for a whole matrix, returning None where it does not apply. `revision` changes when the
    values do, so that cached matrices are recomputed."""

    name: str
    kind: Kind
    symmetric: bool
    fn: Callable[[np.ndarray, np.ndarray, int], float]
    matrix: Callable[[Sequence[np.ndarray], int], np.ndarray | None] | None = None
    revision: int = 1


DISTANCES: Registry[Distance] = Registry("distance")


def register_distance(name: str, kind: Kind, symmetric: bool = True, matrix: Callable | None = None, revision: int = 1):
    """Decorator: register `fn(x, y, seed) -> float` as distance `name` between signatures of `kind` (see Distance)."""
    def decorator(fn: Callable[[np.ndarray, np.ndarray, int], float]):
        DISTANCES.register(name)(Distance(name, kind, symmetric, fn, matrix, revision))
        return fn

    return decorator


# -- token-id unigrams, as the paper's code ---------------------------------------------------------------
_EPS = 1e-10  # added to every histogram bin, not renormalised (as the paper's code)


def _histograms(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unigram frequencies of two token-id arrays over a shared vocabulary, plus 1e-10 per bin.

    Bins beyond the largest id seen are equal (1e-10) in both and add nothing to KL or JS, so the vocabulary
    is cut there."""
    size = int(max(x.max(), y.max())) + 1
    p = np.bincount(x, minlength=size) / len(x) + _EPS
    q = np.bincount(y, minlength=size) / len(y) + _EPS
    return p, q


@register_distance("wd", "tokens")
def wd(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """1-D Wasserstein-1 between the two token-id arrays, ids taken as numbers."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(x, y))


@register_distance("kl", "tokens", symmetric=False)
def kl(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """KL(p_x || p_y) = sum p_x log(p_x / p_y) on the +1e-10 unigram histograms (nats)."""
    p, q = _histograms(x, y)
    return float(np.sum(p * np.log(p / q)))


@register_distance("js", "tokens")
def js(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Jensen-Shannon divergence (nats): KL(p || m) / 2 + KL(q || m) / 2, m = (p + q) / 2, same histograms."""
    p, q = _histograms(x, y)
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))


_MMD_DRAWS = 1000
_MMD_SCALES = np.array([0.2, 0.5, 0.9, 1.3])


def _draw(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)  # one generator per side: equal inputs give equal draws
    return rng.choice(x, size=_MMD_DRAWS, replace=len(x) < _MMD_DRAWS).astype(np.float64)


def _mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Biased MMD^2 estimate from the three kernel matrices."""
    return float(kxx.mean() + kyy.mean() - 2 * kxy.mean())


@register_distance("mmd", "tokens")
def mmd(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Biased MMD^2 between 1000 ids drawn from each, with the kernel sum_a a^2 / (a^2 + (i - j)^2),
    a in {0.2, 0.5, 0.9, 1.3}."""
    a, b = _draw(x, seed), _draw(y, seed)

    def kernel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d2 = (u[:, None] - v[None, :]) ** 2
        return sum(s * s / (s * s + d2) for s in _MMD_SCALES)

    return _mmd2(kernel(a, a), kernel(b, b), kernel(a, b))


# -- point clouds ------------------------------------------------------------------------------------------
_EXACT_OT_MAX = 1_000_000  # n * m up to which W2 uses exact OT; Sinkhorn beyond


@register_distance("w2", "cloud")
def w2(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """2-Wasserstein distance between uniform point clouds (Euclidean ground cost): exact OT up to 10^6 point pairs
    (clouds of one size: an optimal assignment, which an optimal plan between uniform measures of equal size is
    (Birkhoff), solved by scipy's linear_sum_assignment, about twice as fast as the network simplex; else POT's
    emd2), entropic OT (Sinkhorn, reg 0.01 of the largest cost) beyond."""
    import ot

    x, y = x.astype(np.float64), y.astype(np.float64)
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    cost = ot.dist(x, y)  # squared Euclidean
    if len(x) == len(y) and len(x) * len(y) <= _EXACT_OT_MAX:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
        value = cost[rows, cols].mean()
    elif len(x) * len(y) <= _EXACT_OT_MAX:
        value = ot.emd2(a, b, cost, numItermax=10_000_000)
    else:
        scale = float(cost.max()) or 1.0
        value = ot.sinkhorn2(a, b, cost / scale, reg=0.01) * scale
    return float(np.sqrt(max(float(value), 0.0)))


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


@register_distance("mmd-rbf", "cloud")
def mmd_rbf(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """MMD (square root of the biased MMD^2) with a Gaussian kernel exp(-|u - v|^2 / (2 s^2)),
    s^2 the median squared distance between distinct points of the pooled sample (median heuristic)."""
    import ot

    z = np.concatenate([x, y]).astype(np.float64)
    d2 = ot.dist(z, z)
    off = d2[~np.eye(len(z), dtype=bool)]
    bandwidth = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    k = np.exp(-d2 / (2 * bandwidth))
    n = len(x)
    return float(np.sqrt(max(_mmd2(k[:n, :n], k[n:, n:], k[:n, n:]), 0.0)))


def _gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """A cloud [n, d] as its Gaussian: mean [d], a factor F [min(n, d), d] with F^T F its covariance (1/n), and
    the covariance's trace."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    f = (x - mean) / np.sqrt(len(x))
    if len(x) > x.shape[1]:  # fewer rows: the covariance's symmetric square root
        w, v = np.linalg.eigh(f.T @ f)
        f = (v * np.sqrt(np.clip(w, 0.0, None))).T
    return mean, f, float((f * f).sum())


def _bures(gx: tuple[np.ndarray, np.ndarray, float], gy: tuple[np.ndarray, np.ndarray, float]) -> float:
    """W2 between two `_gaussian`s. The cross term tr (S_x^1/2 S_y S_x^1/2)^1/2 is the nuclear norm of F_y F_x^T:
    the square roots of the eigenvalues of a min(n, d)-sized Gram matrix, never a d x d square root per pair."""
    (mx, fx, tx), (my, fy, ty) = gx, gy
    m = fy @ fx.T
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    cross = float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum())
    return float(np.sqrt(max(float(((mx - my) ** 2).sum()) + tx + ty - 2 * cross, 0.0)))


def _gaussian_w2_matrix(sigs: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """All pairs, each cloud's Gaussian computed once. Same values as `gaussian-w2`."""
    gs = [_gaussian(x) for x in sigs]
    n = len(gs)
    out = np.zeros((n, n))
    for i, j in track([(i, j) for i in range(n) for j in range(i + 1, n)], "distance matrix (gaussian-w2)", total=n * (n - 1) // 2):
        out[i, j] = out[j, i] = _bures(gs[i], gs[j])
    return out


@register_distance("gaussian-w2", "cloud", matrix=_gaussian_w2_matrix, revision=2)  # 2: no ridge, factor form
def gaussian_w2(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Frechet (Bures-Wasserstein) distance between Gaussians fitted to the clouds (means, covariances with
    1/n): sqrt(|m_x - m_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)), computed from low-rank factors."""
    return _bures(_gaussian(x), _gaussian(y))


# -- rows and matrices -------------------------------------------------------------------------------------
def get_distance(name: str, kind: str | None = None) -> Distance:
    """The registered distance `name`, checked against the signature kind when given."""
    dist = DISTANCES.get(name)
    if kind is not None and dist.kind != kind:
        fits = ", ".join(n for n in DISTANCES.names() if DISTANCES.get(n).kind == kind)
        raise LoramixError(f"distance '{name}' compares {dist.kind} signatures, not {kind}; use one of: {fits}")
    return dist


def _one_blas_thread():
    """A context in which BLAS runs on one thread: its kernels' sums depend on the thread count (OpenBLAS picks them
    by it), so distances computed otherwise would change from machine to machine."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def distance_row(name: str, query: np.ndarray, refs: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """d(query, refs[j]) for every j: float64 [len(refs)]."""
    fn = DISTANCES.get(name).fn
    with _one_blas_thread():
        return np.array([fn(query, r, seed) for r in track(refs, f"distances ({name})", total=len(refs))])


def distance_matrix(name: str, sigs: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """D[i, j] = d(sigs[i], sigs[j]), float64 [n, n]; for symmetric distances only i < j is computed."""
    dist = DISTANCES.get(name)
    with _one_blas_thread():
        if dist.matrix is not None and (fast := dist.matrix(sigs, seed)) is not None:
            return fast
        n = len(sigs)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j and (i < j or not dist.symmetric)]
        out = np.zeros((n, n))
        for i, j in track(pairs, f"distance matrix ({name})", total=len(pairs)):
            out[i, j] = dist.fn(sigs[i], sigs[j], seed)
            if dist.symmetric:
                out[j, i] = out[i, j]
        return out


def aligned(d_probes: np.ndarray, d_data: np.ndarray) -> np.ndarray:
    """A mixed bank's distance row: `d_data` [n] where it is known (NaN: the entry has no data), elsewhere `d_probes`
    [n] mapped onto the data distances' scale by the least-squares line d_data ~ a d_probes + b fitted on the entries
    that have both (a >= 0: the conditional mean of the data distance given the probe distance; a data-free entry
    whose probe distance says nothing about its data distance gets the data entries' mean). Needs 2 entries with both
    (`BankIndex.mode` asks for 3); +inf stays +inf."""
    d_probes, d_data = np.asarray(d_probes, dtype=np.float64), np.asarray(d_data, dtype=np.float64)
    both = np.isfinite(d_data) & np.isfinite(d_probes)
    if both.sum() < 2:
        raise LoramixError(f"aligning probe distances needs at least 2 entries with data, found {int(both.sum())}")
    x, y = d_probes[both], d_data[both]
    var = x.var()
    a = max(0.0, float(((x - x.mean()) * (y - y.mean())).mean() / var)) if var > 0 else 0.0
    b = float(y.mean() - a * x.mean())
    out = d_data.copy()
    free = np.isnan(d_data)
    out[free] = np.where(np.isfinite(d_probes[free]), a * d_probes[free] + b, np.inf)
    return out
