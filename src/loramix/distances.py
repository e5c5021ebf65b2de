"""Stage 3: distances between two signatures (empirical distributions).

On token-id unigrams (1-D int arrays), the paper's code: `wd`, `kl`, `js`, `mmd` (seeded here).
On point clouds ([n, d] float arrays): `w2`, `sliced`, `mmd-rbf`, `gaussian-w2`."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from .arguments import check_seed
from .errors import LoramixError
from .progress import track
from .registry import Registry

Kind = Literal["tokens", "cloud"]


@dataclass(frozen=True)
class Distance:
    """A registered distance: `fn(x, y, seed) -> float`, for signatures of `kind`; `matrix(sigs, seed)` is an
    optional fast path for a whole matrix, returning None where it does not apply; `batch` (point clouds) computes
    one cloud against many at once, which rows and matrices use. `revision` changes when the values do, so that
    cached matrices are recomputed."""

    name: str
    kind: Kind
    symmetric: bool
    fn: Callable[[np.ndarray, np.ndarray, int], float]
    matrix: Callable[[Sequence[np.ndarray], int], np.ndarray | None] | None = None
    revision: int = 1
    batch: "Batched | None" = None


DISTANCES: Registry[Distance] = Registry("distance")


def register_distance(name: str, kind: Kind, symmetric: bool = True, matrix: Callable | None = None, revision: int = 1):
    """Decorator: register `fn(x, y, seed) -> float` as distance `name` between signatures of `kind` (see Distance)."""
    def decorator(fn: Callable[[np.ndarray, np.ndarray, int], float]):
        DISTANCES.register(name)(Distance(name, kind, symmetric, fn, matrix, revision))
        return fn

    return decorator


Prepared = tuple[np.ndarray, object]  # a cloud as a batched distance uses it: points [n', d] float64, and what else


@dataclass(frozen=True)
class Batched:
    """A symmetric cloud distance computed one query cloud against many: `prepare(x) -> (points, extra)` per cloud
    (see Clouds), then `row(queries, q, refs, lo, hi)` gives d(queries[q], refs[j]) for lo <= j < hi, the products
    of each block of _BLOCK consecutive references in one matrix product. Blocks start at fixed indices (multiples
    of _BLOCK, or lo), so each value depends on the data alone, never on how many threads compute the matrix."""

    prepare: Callable[[np.ndarray], Prepared]
    row: Callable[["Clouds", int, "Clouds", int, int], np.ndarray]


def register_batched(name: str, prepare: Callable[[np.ndarray], Prepared], revision: int = 1):
    """Decorator: register `row(queries, q, refs, lo, hi) -> [hi - lo]` (see Batched) as the symmetric cloud
    distance `name`; its pair function is the one-reference row."""
    def decorator(row):
        def fn(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
            return float(row(Clouds([x], prepare), 0, Clouds([y], prepare), 0, 1)[0])

        fn.__name__, fn.__doc__ = row.__name__, row.__doc__
        DISTANCES.register(name)(Distance(name, "cloud", True, fn, None, revision, Batched(prepare, row)))
        return fn

    return decorator


# -- token-id unigrams, as the paper's code ---------------------------------------------------------------
_EPS = 1e-10  # added to every histogram bin, not renormalised (as the paper's code)
MAX_TOKEN_ID = 2**24 - 1  # token ids beyond every tokenizer's vocabulary (the largest hold about 2**18)


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
_BLOCK = 32  # references whose cross products with a query are one matrix product (at most)
_BLOCK_POINTS = 4096  # and at most this many of their points, unless one cloud alone has more
_KEEP_EXTRA = 1 << 27  # a matrix keeps its clouds' extras (mmd-rbf: within-cloud distances) up to 1 GB of float64
_DUPLICATE = 1e-12  # squared distances below this fraction of the largest squared norm are rounding: duplicate points


class Clouds:
    """Point clouds [n_k, d] as a batched distance reads them, a block of consecutive clouds at a time: each cloud
    prepared (`prepare(x) -> (points [n', d] float64, extra)`) and the block's points stacked. With `keep` (a
    matrix, whose every row reads every cloud) the clouds are prepared and stacked once (their extras too, up to
    _KEEP_EXTRA elements; beyond, they are recomputed per block); without (a row, which reads each cloud once) each
    block is prepared when read and let go, so memory holds one block, not the bank."""

    def __init__(self, clouds: Sequence[np.ndarray], prepare: Callable[[np.ndarray], Prepared], keep: bool = False):
        self.clouds, self.prepare = clouds, prepare
        self._kept: tuple[np.ndarray, np.ndarray, np.ndarray, list | None] | None = None
        if keep and len(clouds):
            points, sq, sizes, extras = self._prepared(0, len(clouds))
            if sum(np.size(e) if isinstance(e, np.ndarray) else 0 for e in extras) > _KEEP_EXTRA:
                extras = None
            self._kept = points, sq, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), extras

    def _prepared(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        parts, extras = [], []
        for k in range(lo, hi):
            points, extra = self.prepare(self.clouds[k])
            parts.append(points)
            extras.append(extra)
        points = np.concatenate(parts)
        return points, (points * points).sum(1), np.array([len(x) for x in parts], dtype=np.int64), extras

    def block(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Clouds lo <= k < hi: their points stacked [sum n_k', d] float64, squared norms [sum n_k'], sizes [hi - lo]
        and extras [hi - lo]."""
        if self._kept is None:
            return self._prepared(lo, hi)
        points, sq, starts, extras = self._kept
        span = slice(int(starts[lo]), int(starts[hi]))
        kept = extras[lo:hi] if extras is not None else [self.prepare(self.clouds[k])[1] for k in range(lo, hi)]
        return points[span], sq[span], np.diff(starts[lo : hi + 1]), kept

    def end(self, lo: int, hi: int) -> int:
        """Where the block that starts at cloud `lo` ends (<= hi): at the next multiple of _BLOCK, or sooner when its
        clouds hold more than _BLOCK_POINTS points (one cloud at least). A function of the data alone."""
        end, points = lo, 0
        while end < hi and (end == lo or (end % _BLOCK and points + len(self.clouds[end]) <= _BLOCK_POINTS)):
            points += len(self.clouds[end])
            end += 1
        return end


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


def _workers(workers: int | None) -> int:
    """Threads for a batched distance: `workers`, default the CPUs this process may use."""
    return max(1, workers or len(os.sched_getaffinity(0)))


def _checked(dist: Distance, sigs: Sequence[np.ndarray], seed: int, where: str) -> None:
    """Refuse signatures `dist` cannot compare (one line naming `where`): token ids are non-empty 1-D arrays of
    non-negative integers; point clouds non-empty 2-D arrays of finite numbers, all of one dimension."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise LoramixError(f"{where}(): seed must be int, got {type(seed).__name__} {seed!r}")
    check_seed(f"{where}(): ", int(seed))
    dims = set()
    for i, x in enumerate(sigs):
        what = f"{where}(): signature {i}"
        if not isinstance(x, np.ndarray):
            raise LoramixError(f"{what} must be a numpy array, got {type(x).__name__}")
        if dist.kind == "tokens":
            if x.ndim != 1 or x.dtype.kind not in "iu" or not x.size or (x.dtype.kind == "i" and x.min() < 0):
                raise LoramixError(f"{what}: distance '{dist.name}' compares token ids, a non-empty 1-D array of "
                                   f"non-negative integers; got {x.dtype} {list(x.shape)}")
            if int(x.max()) > MAX_TOKEN_ID:  # its histogram would hold a bin per id up to it
                raise LoramixError(f"{what}: token id {int(x.max())} exceeds {MAX_TOKEN_ID:,}, beyond any tokenizer's "
                                   "vocabulary")
        else:
            if x.ndim != 2 or x.dtype.kind not in "iuf" or not x.shape[0] or not np.isfinite(x).all():
                raise LoramixError(f"{what}: distance '{dist.name}' compares point clouds, a 2-D array [n >= 1, d] of "
                                   f"finite numbers; got {x.dtype} {list(x.shape)}")
            dims.add(x.shape[1])
    if len(dims) > 1:
        raise LoramixError(f"{where}(): the point clouds have different dimensions {sorted(dims)}")


def distance_row(name: str, query: np.ndarray, refs: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """d(query, refs[j]) for every j: float64 [len(refs)]."""
    dist = DISTANCES.get(name)
    _checked(dist, [query, *refs], seed, "distance_row")
    with _one_blas_thread():
        if dist.batch is not None:  # blocks of references on threads (block by block, as one row would)
            batch, n = dist.batch, len(refs)
            x, ys = Clouds([query], batch.prepare, keep=True), Clouds(refs, batch.prepare)
            starts = [0]
            while starts[-1] < n:
                starts.append(ys.end(starts[-1], n))
            with ThreadPoolExecutor(_workers(None), thread_name_prefix="loramix-distances") as pool:
                parts = pool.map(lambda j: batch.row(x, 0, ys, starts[j], starts[j + 1]), range(len(starts) - 1))
                return np.concatenate([*parts, np.zeros(0)])
        return np.array([dist.fn(query, r, seed) for r in track(refs, f"distances ({name})", total=len(refs))])


def distance_matrix(name: str, sigs: Sequence[np.ndarray], seed: int = 0, workers: int | None = None) -> np.ndarray:
    """D[i, j] = d(sigs[i], sigs[j]), float64 [n, n]; for symmetric distances only i < j is computed. Batched
    distances run their rows on `workers` threads (default: the CPUs this process may use), each BLAS call on one
    thread: the values do not depend on `workers`."""
    dist = DISTANCES.get(name)
    _checked(dist, sigs, seed, "distance_matrix")
    n = len(sigs)
    out = np.zeros((n, n))
    with _one_blas_thread():
        if dist.matrix is not None and (fast := dist.matrix(sigs, seed)) is not None:
            return fast
        if dist.batch is not None and n:
            clouds = Clouds(sigs, dist.batch.prepare, keep=True)
            with ThreadPoolExecutor(_workers(workers), thread_name_prefix="loramix-distances") as pool:
                rows = pool.map(lambda i: dist.batch.row(clouds, i, clouds, i + 1, n), range(n))
                for i, row in enumerate(track(rows, f"distance matrix ({name})", total=n)):
                    out[i, i + 1 :] = out[i + 1 :, i] = row
            return out
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j and (i < j or not dist.symmetric)]
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
    if d_probes.ndim != 1 or d_probes.shape != d_data.shape:
        raise LoramixError(f"aligned(): the probe and data distances must be two rows of one length, got "
                           f"{list(d_probes.shape)} and {list(d_data.shape)}")
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
