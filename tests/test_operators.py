import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramix import LoramixError, Neural, coefficients, softmin
from loramix.operators import keep_top_k, zscore

# distances on a 0.01 grid: real rows, without spreads below floating-point resolution
rows = st.lists(st.integers(0, 10_000), min_size=2, max_size=30).map(lambda v: np.array(v) / 100)


def test_softmin_known_values():
    assert np.allclose(softmin(np.array([0.0, np.log(2)])), [2 / 3, 1 / 3])
    assert np.allclose(softmin(np.array([0.0, 2 * np.log(2)]), temperature=2), [2 / 3, 1 / 3])


def test_excluded_entries_get_zero():
    c = coefficients(np.array([1.0, np.inf, 2.0]), "attentional")
    assert c[1] == 0 and c.sum() == pytest.approx(1)
    with pytest.raises(LoramixError, match="no bank entry"):
        softmin(np.array([np.inf, np.inf]))


@settings(max_examples=60, deadline=None)
@given(rows, st.sampled_from(["attentional", "normalized"]), st.floats(0.05, 10), st.one_of(st.none(), st.integers(1, 5)))
def test_coefficients_are_a_distribution(d, op, t, k):
    c = coefficients(d, op, temperature=t, top_k=k)
    assert np.all(c >= 0) and c.sum() == pytest.approx(1)
    if k is not None:
        assert np.count_nonzero(c) <= k


@settings(max_examples=40, deadline=None)
@given(rows, st.floats(0.1, 10), st.floats(-50, 50))
def test_normalized_ignores_scale_and_offset(d, a, b):
    assert np.allclose(coefficients(d, "normalized"), coefficients(a * d + b, "normalized"), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(rows, st.randoms(use_true_random=False))
def test_permuting_distances_permutes_coefficients(d, rnd):
    perm = np.array(rnd.sample(range(len(d)), len(d)))
    for op in ("attentional", "normalized"):
        assert np.allclose(coefficients(d[perm], op), coefficients(d, op)[perm])


def test_attentional_order_and_temperature():
    d = np.array([1.0, 2.0, 3.0])
    c = coefficients(d, "attentional")
    assert c[0] > c[1] > c[2]
    assert np.allclose(coefficients(d, "attentional", temperature=1e6), 1 / 3, atol=1e-5)
    assert coefficients(d, "attentional", temperature=1e-3)[0] == pytest.approx(1)


def test_top_k():
    c = np.array([0.1, 0.4, 0.2, 0.3])
    assert np.allclose(keep_top_k(c, 2), [0, 4 / 7, 0, 3 / 7])
    assert keep_top_k(c, 10) is c
    with pytest.raises(LoramixError):
        keep_top_k(c, 0)


def test_zscore_constant_row_and_inf():
    assert np.allclose(zscore(np.array([2.0, 2.0, np.inf]))[:2], 0)
    assert np.isinf(zscore(np.array([1.0, 2.0, np.inf]))[2])


def test_neural_needs_fitting():
    with pytest.raises(LoramixError, match="fitted"):
        coefficients(np.array([1.0, 2.0]), "neural")


def test_neural_fit_lowers_reconstruction_loss_and_roundtrips(tmp_path):
    rng = np.random.default_rng(0)
    # 12 adapters in 3 clusters; distances small within a cluster
    centers = rng.normal(size=(3, 50))
    w = np.repeat(centers, 4, axis=0) + 0.1 * rng.normal(size=(12, 50))
    labels = np.repeat(np.arange(3), 4)
    d = np.where(labels[:, None] == labels[None, :], 0.2, 1.0) + 0.05 * rng.random((12, 12))
    op = Neural().fit(d, w @ w.T, epochs=200, lr=1e-2)
    assert op.history[-1] < op.history[0]
    row = d[0].copy()
    row[0] = np.inf
    c = op.coefficients(row)
    assert c[0] == 0 and c.sum() == pytest.approx(1) and np.all(c >= 0)
    assert c[1:4].sum() > 0.5  # the adapter's own cluster dominates
    again = Neural.from_bytes(op.to_bytes())
    assert np.allclose(again.coefficients(row), c) and again.history == op.history
