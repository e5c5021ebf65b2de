"""Distances between token-id unigrams (1-D int arrays), as the paper's code computes them: `wd`, `kl`, `js`, `mmd`
(seeded here)."""

from __future__ import annotations

import numpy as np

from .core import register_distance

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
