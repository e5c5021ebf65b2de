"""What a distance is and how distances are computed: the registry (`register_distance`, `register_batched`), the
batched layout of point clouds (`Clouds`), and the one way to compute a row or a matrix (`distance_row`,
`distance_matrix`, deterministic whatever the thread count), each signature checked first."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from ..arguments import check_seed
from ..errors import LoramixError
from ..progress import track
from ..registry import Registry

MAX_TOKEN_ID = 2**24 - 1  # token ids beyond every tokenizer's vocabulary (the largest hold about 2**18)

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


_BLOCK = 32  # references whose cross products with a query are one matrix product (at most)
_BLOCK_POINTS = 4096  # and at most this many of their points, unless one cloud alone has more
_KEEP_EXTRA = 1 << 27  # a matrix keeps its clouds' extras (mmd-rbf: within-cloud distances) up to 1 GB of float64


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
