import numpy as np
import pytest

from loramix import DISTANCES, LoramixError, distance_matrix, distance_row
from loramix.distances import get_distance

CLOUD = ["w2", "sliced", "mmd-rbf", "gaussian-w2"]
TOKENS = ["wd", "kl", "js", "mmd"]


@pytest.fixture
def clouds():
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) + 0.7


@pytest.fixture
def tokens():
    rng = np.random.default_rng(0)
    return rng.integers(0, 50, 400), rng.integers(20, 90, 300)


def test_registry_kinds():
    assert set(DISTANCES.names()) == set(CLOUD + TOKENS)
    assert {get_distance(n).kind for n in CLOUD} == {"cloud"}
    assert {get_distance(n).kind for n in TOKENS} == {"tokens"}
    with pytest.raises(LoramixError, match="compares tokens signatures, not cloud"):
        get_distance("kl", "cloud")


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_zero_on_identical_and_positive_otherwise(name, clouds):
    x, y = clouds
    fn = get_distance(name).fn
    assert fn(x, x.copy(), 0) == pytest.approx(0, abs=1e-4)
    assert fn(x, y, 0) > 0.1


@pytest.mark.parametrize("name", TOKENS)
def test_tokens_zero_on_identical_and_positive_otherwise(name, tokens):
    x, y = tokens
    fn = get_distance(name).fn
    assert fn(x, x.copy(), 0) == pytest.approx(0, abs=1e-9)
    assert fn(x, y, 0) > 0.01


@pytest.mark.parametrize("name", [n for n in CLOUD + TOKENS if get_distance(n).symmetric])
def test_symmetric(name, clouds, tokens):
    x, y = tokens if get_distance(name).kind == "tokens" else clouds
    fn = get_distance(name).fn
    assert fn(x, y, 3) == pytest.approx(fn(y, x, 3), rel=1e-6, abs=1e-9)


def test_kl_is_asymmetric_and_matches_closed_form():
    x, y = np.array([0, 1]), np.array([0, 0, 0, 1])
    want = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert get_distance("kl").fn(x, y, 0) == pytest.approx(want, rel=1e-6)
    assert get_distance("kl").fn(y, x, 0) != pytest.approx(want, rel=1e-3)


def test_js_disjoint_supports_is_log2():
    assert get_distance("js").fn(np.array([0, 1, 2]), np.array([3, 4]), 0) == pytest.approx(np.log(2), rel=1e-6)


def test_wd_closed_form():
    assert get_distance("wd").fn(np.array([0, 0, 0]), np.array([2, 2]), 0) == pytest.approx(2.0)


def test_mmd_unigram_is_seeded(tokens):
    x, y = tokens
    fn = get_distance("mmd").fn
    assert fn(x, y, 1) == fn(x, y, 1)
    assert fn(x, y, 1) != fn(x, y, 2)


def test_translation_closed_forms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    v = np.array([0.3, -1.2, 0.5])
    shift = float(np.linalg.norm(v))
    assert get_distance("w2").fn(x, x + v, 0) == pytest.approx(shift, rel=1e-6)
    assert get_distance("gaussian-w2").fn(x, x + v, 0) == pytest.approx(shift, rel=1e-3)
    x1 = rng.normal(size=(40, 1))
    assert get_distance("sliced").fn(x1, x1 + 2.0, 0) == pytest.approx(2.0, rel=1e-6)  # in 1-D, sliced = W2


def test_gaussian_w2_scaled_covariance():
    # N(0, I) vs N(0, 4I) in d dims: W2 = sqrt(d) * |1 - 2|; large samples approach it
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 2))
    assert get_distance("gaussian-w2").fn(x, 2 * x, 0) == pytest.approx(np.sqrt(2), rel=1e-3)


def test_w2_sinkhorn_beyond_exact_limit(monkeypatch):
    import loramix.distances.clouds as d

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(30, 2)) + 1
    exact = d.w2(x, y)
    monkeypatch.setattr(d, "_EXACT_OT_MAX", 10)
    assert d.w2(x, y) == pytest.approx(exact, rel=0.1)


@pytest.mark.parametrize("n,d", [(40, 3), (128, 768)])
def test_w2_of_equal_sizes_is_the_network_simplex_value(n, d):
    """Clouds of one size take an optimal assignment; POT's network simplex on the same costs agrees."""
    import ot

    from loramix.distances.clouds import w2

    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.3
    u = np.full(n, 1 / n)
    assert w2(x, y) == pytest.approx(float(np.sqrt(ot.emd2(u, u, ot.dist(x, y), numItermax=10_000_000))), rel=1e-9)


def test_row_and_matrix(clouds):
    x, y = clouds
    sigs = [x, y, x[:30], y[:20]]
    m = distance_matrix("w2", sigs)
    assert m.shape == (4, 4) and np.allclose(np.diag(m), 0) and np.allclose(m, m.T)
    assert np.allclose(distance_row("w2", x, sigs), m[0], atol=1e-6)
    k = distance_matrix("kl", [np.array([0, 1]), np.array([0, 0, 1])])
    assert k[0, 1] != pytest.approx(k[1, 0])


def test_sliced_matrix_fast_path_equals_pairwise():
    from loramix.distances.clouds import _sliced_matrix

    rng = np.random.default_rng(4)
    sigs = [rng.normal(size=(20, 6)) + i * 0.3 for i in range(5)]
    fast = distance_matrix("sliced", sigs, seed=2)
    slow = np.array([[get_distance("sliced").fn(a, b, 2) for b in sigs] for a in sigs])
    assert np.allclose(fast, slow, atol=1e-9)
    assert _sliced_matrix(sigs[:2] + [sigs[2][:10]], 0) is None  # unequal sizes: pairwise


def test_gaussian_w2_matches_the_dense_formula_pot_and_its_matrix():
    """The factor form equals the dense Bures-Wasserstein formula between the empirical Gaussians, for clouds with
    fewer points than dimensions (singular covariances) and more, and POT's where POT is defined (full rank); the
    matrix path gives the same values."""
    import ot

    from loramix.distances import distance_matrix

    def psd_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    def dense(x, y):
        sx, sy = np.cov(x.T, bias=True), np.cov(y.T, bias=True)
        r = psd_sqrt(sx)
        d2 = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.trace(psd_sqrt(r @ sy @ r))
        return float(np.sqrt(max(d2, 0)))

    rng = np.random.default_rng(4)
    clouds = [rng.normal(size=(12, 20)) * 1.7, rng.normal(size=(60, 20)) + 1.0, rng.normal(size=(80, 20)) @ rng.normal(size=(20, 20))]
    fn = get_distance("gaussian-w2").fn
    for x in clouds:
        for y in clouds:
            assert fn(x, y, 0) == pytest.approx(dense(x, y), rel=1e-6, abs=1e-4)  # dense sqrt: ~1e-5 off at 0
    pot = float(ot.gaussian.empirical_bures_wasserstein_distance(clouds[1], clouds[2], reg=1e-12))
    assert fn(clouds[1], clouds[2], 0) == pytest.approx(pot, rel=1e-6)
    matrix = distance_matrix("gaussian-w2", clouds)
    assert np.allclose(matrix, [[fn(x, y, 0) for y in clouds] for x in clouds], rtol=1e-10, atol=1e-12)


def _mmd_rbf_dense(x, y):
    """The pooled-sample formula: every squared distance of the 2n points, median of the off-diagonal ones that are not
    duplicates."""
    import ot

    z = np.concatenate([x, y]).astype(np.float64)
    d2 = ot.dist(z, z)
    off = d2[~np.eye(len(z), dtype=bool)]
    tie = 1e-12 * (z * z).sum(1).max()  # duplicates up to rounding
    bw = float(np.median(off[off > tie])) if np.any(off > tie) else 1.0
    k = np.exp(-d2 / (2 * bw))
    n = len(x)
    return float(np.sqrt(max(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean(), 0.0)))


def test_mmd_rbf_is_the_pooled_median_heuristic_with_duplicates_and_unequal_sizes():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(25, 7)), rng.normal(size=(18, 7)) + 0.4
    dup = np.concatenate([x[:10], x[:10], x[:5]])  # repeated points: pairs at distance 0 are left out of the median
    fn = get_distance("mmd-rbf").fn
    for a, b in [(x, y), (y, x), (x, dup), (dup, dup), (x, x)]:
        assert fn(a, b, 0) == pytest.approx(_mmd_rbf_dense(a, b), rel=1e-9, abs=1e-7)
    same = np.zeros((4, 3))
    assert fn(same, same, 0) == 0.0  # no positive distance: bandwidth 1


@pytest.mark.parametrize("name", ["w2", "mmd-rbf", "gaussian-w2"])
def test_batched_matrix_is_the_pairwise_values_whatever_the_thread_count(name):
    """Matrices of the batched distances (blocks of references in one product, rows on threads): equal to the pair
    function, their rows equal to distance_row, and the same bytes on 1 or 3 threads; clouds of several sizes, more
    of them than a block holds."""
    from loramix.distances.core import _BLOCK

    rng = np.random.default_rng(6)
    sigs = [rng.normal(size=(int(rng.choice([6, 6, 6, 9])), 5)) + 0.2 * i for i in range(_BLOCK + 9)]
    one = distance_matrix(name, sigs, workers=1)
    assert one.tobytes() == distance_matrix(name, sigs, workers=3).tobytes()
    fn = get_distance(name).fn
    pairs = [(0, 1), (2, 30), (5, _BLOCK + 3), (_BLOCK + 8, 1)]
    for i, j in pairs:
        assert one[i, j] == pytest.approx(fn(sigs[i], sigs[j], 0), rel=1e-9, abs=1e-9)
    row = distance_row(name, sigs[4], sigs)
    assert row[4] < 1e-6 and np.allclose(np.delete(row, 4), np.delete(one[4], 4), rtol=1e-9, atol=1e-9)  # d(x, x): rounding
    assert np.allclose(one, one.T) and not np.diag(one).any()
    assert distance_matrix(name, []).shape == (0, 0) and distance_row(name, sigs[0], []).shape == (0,)


@pytest.mark.parametrize("name", ["w2", "mmd-rbf", "gaussian-w2"])
def test_batched_blocks_are_bounded_by_points_and_extras_by_size(name, monkeypatch):
    """Large clouds: a block holds at most _BLOCK_POINTS points (one cloud at least) and a matrix keeps no extras
    beyond _KEEP_EXTRA (recomputed per block instead); the values are the same."""
    import loramix.distances.core as d

    rng = np.random.default_rng(7)
    sigs = [rng.normal(size=(int(n), 4)) + 0.1 * i for i, n in enumerate(rng.integers(5, 14, size=12))]
    want = distance_matrix(name, sigs, workers=2)
    monkeypatch.setattr(d, "_BLOCK_POINTS", 20)
    monkeypatch.setattr(d, "_KEEP_EXTRA", 0)
    clouds = d.Clouds(sigs, get_distance(name).batch.prepare)
    assert [clouds.end(j, len(sigs)) - j for j in (0, 5)] != [d._BLOCK, d._BLOCK] and clouds.end(0, 12) >= 1
    assert np.allclose(distance_matrix(name, sigs, workers=2), want, rtol=1e-10, atol=1e-12)
    assert np.allclose(distance_row(name, sigs[3], sigs)[4:], want[3, 4:], rtol=1e-10, atol=1e-12)
