import numpy as np
import pytest
import torch
from helpers import TINY_SHAPES, make_bank, write_adapter

from loramix import Bank, LoramixError, compose, gram_matrix
from loramix.adapter import LoraAdapter, pattern_value


def dense_sum(bank: Bank, coefficients: dict[str, float], module: str) -> torch.Tensor:
    """sum_i c_i DeltaW_i computed densely, float64."""
    total = torch.zeros(bank.shapes[module], dtype=torch.float64)
    for e in bank.entries:
        if module in e.adapter.modules and coefficients.get(e.name, 0):
            total += coefficients[e.name] * e.adapter.delta(module)
    return total


def composed_delta(comp, module: str) -> torch.Tensor:
    a, b = comp.factors[module]
    r = a.shape[0]
    cfg = comp.config
    rr = pattern_value(cfg["rank_pattern"], module, cfg["r"])
    alpha = pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"])
    assert rr == r
    scale = alpha / (r**0.5 if cfg["use_rslora"] else r)
    return scale * (b.double() @ a.double())


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.fixture
def mixed(tmp_path):
    b = Bank(make_bank(tmp_path / "bank", mixed=True))
    rng = np.random.default_rng(0)
    c = rng.dirichlet(np.ones(len(b.entries)))
    return b, {e.name: float(x) for e, x in zip(b.entries, c)}


def test_bank_reads_mixed_scales(mixed):
    b, _ = mixed
    rs = b.entry("task_fruits").adapter.modules["model.layers.0.self_attn.q_proj"]
    assert rs.rank == 4 and rs.scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    pat = b.entry("task_numbers").adapter.modules
    assert pat["model.layers.1.self_attn.q_proj"].rank == 2
    assert pat["model.layers.1.self_attn.q_proj"].scale == pytest.approx(8 / 2)
    assert pat["model.layers.0.self_attn.v_proj"].scale == pytest.approx(3 / 4)
    assert b.max_rank == 8


def test_exact_full_equals_dense_sum(mixed):
    b, c = mixed
    comp = compose(b, c, method="exact", rank="full")
    for m in b.shapes:
        assert rel(composed_delta(comp, m), dense_sum(b, c, m)) <= 1e-5
        assert comp.energy[m] == pytest.approx(1.0)
    # full rank is the stacked rank: sum of the entries' ranks (4 + 2 + 4 + 4 + 8 + 4 + 2 + 4 for q/k/v of layer 0)
    assert comp.rank == sum(e.adapter.modules["model.layers.0.self_attn.k_proj"].rank for e in b.entries)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_truncation_is_optimal(mixed, k):
    b, c = mixed
    comp = compose(b, c, method="exact", rank=k)
    assert comp.rank == k and comp.config["r"] == k
    for m in b.shapes:
        exact = dense_sum(b, c, m)
        s = torch.linalg.svdvals(exact)
        tail = float(s[k:].pow(2).sum().sqrt())
        err = float((composed_delta(comp, m) - exact).norm())
        assert err == pytest.approx(tail, rel=1e-6, abs=1e-9)
        assert comp.energy[m] == pytest.approx(float(s[:k].pow(2).sum() / s.pow(2).sum()), rel=1e-9)


def test_default_rank_is_largest_bank_rank(mixed):
    b, c = mixed
    comp = compose(b, c)
    assert comp.rank == 8 and comp.config["r"] == 8 and comp.config["lora_alpha"] == 8


def test_zero_coefficients_are_skipped_and_output_covers_every_module(tmp_path):
    root = tmp_path / "bank"
    write_adapter(root / "a", seed=1)
    only_q = {k: v for k, v in TINY_SHAPES.items() if k.endswith("q_proj")}
    write_adapter(root / "b", seed=2, shapes=only_q)
    b = Bank(root)
    comp = compose(b, {"b": 1.0}, rank=4)
    assert set(comp.factors) == set(TINY_SHAPES)
    assert float(comp.factors["model.layers.0.self_attn.k_proj"][1].abs().sum()) == 0.0
    m = "model.layers.0.self_attn.q_proj"
    assert rel(composed_delta(comp, m), dense_sum(b, {"b": 1.0}, m)) <= 1e-5


def test_paper_equals_flattened_c_at_w(tmp_path):
    b = Bank(make_bank(tmp_path / "bank", n=5))
    c = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    coefs = {e.name: float(x) for e, x in zip(b.entries, c)}
    rows = []
    for e in b.entries:
        rows.append(torch.cat([t.double().flatten() for m in sorted(b.shapes) for t in e.adapter.factors(m)]))
    w = torch.stack(rows)
    expected = torch.as_tensor(c) @ w
    comp = compose(b, coefs, method="paper")
    got = torch.cat([t.double().flatten() for m in sorted(b.shapes) for t in comp.factors[m]])
    assert rel(got, expected) <= 1e-6
    assert comp.config["r"] == 4 and comp.config["lora_alpha"] == 8


def test_paper_keeps_rank_patterns(tmp_path):
    root = tmp_path / "bank"
    for i in range(3):
        write_adapter(root / f"e{i}", seed=i, rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"k_proj": 3})
    b = Bank(root)
    comp = compose(b, {"e0": 0.5, "e1": 0.5}, method="paper")
    for m, spec in b.entries[0].adapter.modules.items():
        assert comp.factors[m][0].shape[0] == spec.rank
        a, bb = comp.factors[m]
        cfg = comp.config
        r = pattern_value(cfg["rank_pattern"], m, cfg["r"])
        alpha = pattern_value(cfg["alpha_pattern"], m, cfg["lora_alpha"])
        assert (r, alpha / r) == (spec.rank, pytest.approx(spec.scale))


def test_paper_refuses_mixed_ranks(mixed):
    b, c = mixed
    with pytest.raises(LoramixError, match="needs equal ranks and scales"):
        compose(b, c, method="paper")


def test_paper_differs_from_sum_of_updates(tmp_path):
    b = Bank(make_bank(tmp_path / "bank", n=3))
    c = {e.name: 1 / 3 for e in b.entries}
    paper = compose(b, c, method="paper")
    m = "model.layers.0.self_attn.q_proj"
    assert rel(composed_delta(paper, m), dense_sum(b, c, m)) > 0.1  # the cross terms


def test_output_dtype(tmp_path):
    b = Bank(make_bank(tmp_path / "bank", n=3, dtype=torch.float16))
    assert b.dtype == torch.float16
    comp = compose(b, {b.entries[0].name: 1.0})
    assert comp.factors["model.layers.0.self_attn.q_proj"][0].dtype == torch.float16
    comp = compose(b, {b.entries[0].name: 1.0}, dtype=torch.float32)
    assert comp.factors["model.layers.0.self_attn.q_proj"][0].dtype == torch.float32


def test_rank_must_be_positive(mixed):
    b, c = mixed
    with pytest.raises(LoramixError, match="at least 1"):
        compose(b, c, rank=0)
    with pytest.raises(LoramixError, match="zero"):
        compose(b, {})


def test_gram_matrix_spaces(mixed):
    b, _ = mixed
    entries = b.entries
    g = gram_matrix(b, entries, "updates")
    for i, ei in enumerate(entries[:4]):
        for j, ej in enumerate(entries[:4]):
            dense = sum(float((ei.adapter.delta(m) * ej.adapter.delta(m)).sum()) for m in b.shapes)
            assert g[i, j] == pytest.approx(dense, rel=1e-9)
    same = Bank(make_bank(b.path.parent / "same", n=3))
    gp = gram_matrix(same, same.entries, "params")
    flat = [torch.cat([t.double().flatten() for m in sorted(same.shapes) for t in e.adapter.factors(m)]) for e in same.entries]
    assert gp[0, 1] == pytest.approx(float(flat[0] @ flat[1]), rel=1e-9)


def test_adapter_delta_helper(tmp_path):
    ad = LoraAdapter(write_adapter(tmp_path / "a", rank=4, alpha=8))
    a, b = ad.factors("model.layers.0.self_attn.q_proj")
    assert torch.allclose(ad.delta("model.layers.0.self_attn.q_proj"), 2.0 * (b.double() @ a.double()))


@pytest.mark.parametrize("kwargs", [{"rank": 3}, {"rank": "full"}, {"method": "paper"}])
def test_streamed_composition_equals_in_memory(tmp_path, kwargs):
    from safetensors.torch import load_file

    from loramix.compose import write_composition

    b = Bank(make_bank(tmp_path / "bank", n=4))
    c = {e.name: w for e, w in zip(b.entries, [0.4, 0.3, 0.2, 0.1])}
    mem = compose(b, c, **kwargs)
    streamed = write_composition(tmp_path, b, c, **kwargs)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert streamed.factors == {} and streamed.energy == pytest.approx(mem.energy) and streamed.config == mem.config
    for m, (a, bb) in mem.factors.items():
        assert torch.equal(tensors[f"base_model.model.{m}.lora_A.weight"], a)
        assert torch.equal(tensors[f"base_model.model.{m}.lora_B.weight"], bb)


def test_safetensors_writer_checks_shapes_and_completeness(tmp_path):
    from loramix.adapter import SafetensorsWriter

    specs = {"x": (torch.float16, (2, 3)), "y": (torch.bfloat16, (4,))}
    with pytest.raises(ValueError, match="expected"):
        with SafetensorsWriter(tmp_path / "a.safetensors", specs) as w:
            w.write("x", torch.zeros(3, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="never written: y"):
        with SafetensorsWriter(tmp_path / "b.safetensors", specs) as w:
            w.write("x", torch.zeros(2, 3, dtype=torch.float16))


def test_randomized_truncation_for_large_stacked_rank(mixed, monkeypatch):
    import importlib

    comp_mod = importlib.import_module("loramix.compose.exact")  # the package attribute `compose` is the function

    b, c = mixed
    exact = compose(b, c, rank=3)
    monkeypatch.setattr(comp_mod, "EXACT_MAX_STACKED_RANK", 8)
    approx = compose(b, c, rank=3)
    assert set(approx.energy.values()) == {None} and approx.mean_energy is None
    for m in b.shapes:
        want = dense_sum(b, c, m)
        optimal = float((composed_delta(exact, m) - want).norm())
        got = float((composed_delta(approx, m) - want).norm())
        assert got <= optimal * 1.001 + 1e-6


def test_float32_factorisation_for_large_stacks(mixed, monkeypatch):
    import importlib

    b, c = mixed
    monkeypatch.setattr(importlib.import_module("loramix.compose.exact"), "EXACT_FLOAT64_MAX_ELEMENTS", 0)
    comp = compose(b, c, rank="full")
    for m in b.shapes:
        assert rel(composed_delta(comp, m), dense_sum(b, c, m)) <= 1e-5


# -- properties ------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

weights = st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5).filter(lambda w: sum(w) > 1e-3)


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    return Bank(make_bank(root / "bank", n=5, mixed=True))


def _dense(comp, bank):
    return {m: composed_delta(comp, m) for m in bank.shapes}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w1=weights, w2=weights)
def test_exact_composition_is_linear(five, w1, w2):
    names = [e.name for e in five.entries]
    c1, c2 = dict(zip(names, w1)), dict(zip(names, w2))
    both = {n: c1[n] + c2[n] for n in names}
    d1, d2, d12 = (_dense(compose(five, c, rank="full"), five) for c in (c1, c2, both))
    for m in five.shapes:
        assert float((d12[m] - d1[m] - d2[m]).norm()) <= 1e-9 + 1e-6 * float(d12[m].norm())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=weights, k=st.integers(1, 12))
def test_truncation_error_never_above_the_tail(five, w, k):
    c = {e.name: x for e, x in zip(five.entries, w)}
    comp = compose(five, c, rank=k)
    for m in five.shapes:
        exact = dense_sum(five, c, m)
        tail = float(torch.linalg.svdvals(exact)[k:].pow(2).sum().sqrt())
        # + round-off: the output factors are stored in float32 (relative 1e-7 of the update's norm)
        assert float((composed_delta(comp, m) - exact).norm()) <= tail * (1 + 1e-6) + 1e-6 * float(exact.norm())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=weights, perm=st.permutations(range(5)))
def test_bank_order_changes_nothing(five, tmp_path_factory, w, perm):
    import shutil

    root = tmp_path_factory.mktemp("perm")
    entries = five.entries
    for new_pos, old in enumerate(perm):  # same adapters under names that sort in another order
        shutil.copytree(entries[old].adapter.path, root / f"e{new_pos}")
    other = Bank(root)
    c = {e.name: x for e, x in zip(entries, w)}
    c_other = {f"e{new_pos}": c[entries[old].name] for new_pos, old in enumerate(perm)}
    for rank in (3, "full"):
        a, b = _dense(compose(five, c, rank=rank), five), _dense(compose(other, c_other, rank=rank), other)
        for m in five.shapes:
            assert float((a[m] - b[m]).norm()) <= 1e-9 + 1e-7 * float(a[m].norm())


def test_factors_match_safetensors_and_leave_no_file_mapped(tmp_path):
    """Tensor data is read with plain reads (dtype and shape as stored), so composing a bank keeps none of its
    files open or memory-mapped: resident memory does not grow with the bank."""
    import os

    from safetensors.torch import load_file

    bank = Bank(make_bank(tmp_path / "bank", n=4, mixed=True))
    for e in bank.entries:
        stored = load_file(e.adapter.path / "adapter_model.safetensors")
        for m in e.adapter.modules:
            a, b = e.adapter.factors(m)
            want_a, want_b = (stored[f"base_model.model.{m}.lora_{x}.weight"] for x in "AB")
            assert a.dtype == want_a.dtype and torch.equal(a, want_a) and torch.equal(b, want_b)
    other = Bank(make_bank(tmp_path / "other", n=4, mixed=True))  # read by loramix only
    compose(other, {e.name: 0.25 for e in other.entries}, rank=4)
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    assert str(tmp_path / "other") not in maps
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []
    assert not any(str(tmp_path / "other") in os.readlink(f"/proc/self/fd/{fd}") for fd in fds if os.path.exists(f"/proc/self/fd/{fd}"))


@pytest.mark.parametrize("order", ["b_then_a", "all_b_first"])
def test_read_into_fills_strided_and_converted_destinations_whatever_the_file_order(tmp_path, order):
    """read_into (the randomized range finder's reader) writes each module's A into rows and B into transposed rows of
    float32 stacks, from float16 storage, in whatever order the file holds the tensors: B right before A (one read
    across both), or apart (two reads); a destination of another shape is refused before anything is read."""
    import json

    from safetensors.torch import load_file

    folder = write_adapter(tmp_path / "ad", rank=3, dtype=torch.float16)
    f = folder / "adapter_model.safetensors"
    tensors = {k: t.clone() for k, t in load_file(f).items()}  # load_file maps the file, rewritten below
    keys = sorted(tensors, key=lambda k: ("lora_A" in k, k)) if order == "all_b_first" else sorted(
        tensors, key=lambda k: (k.rsplit(".lora_", 1)[0], "lora_A" in k))
    header, blobs, start = {}, [], 0
    for k in keys:
        data = tensors[k].contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": "F16", "shape": list(tensors[k].shape), "data_offsets": [start, start + len(data)]}
        blobs.append(data)
        start += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    ad = LoraAdapter(folder)
    for m, mod in ad.modules.items():
        a_stack = torch.full((mod.rank + 2, mod.in_features), float("nan"))
        bt_stack = torch.full((mod.rank + 2, mod.out_features), float("nan"))
        ad.read_into(m, a_stack[1 : 1 + mod.rank], bt_stack[1 : 1 + mod.rank].T)
        assert torch.equal(a_stack[1 : 1 + mod.rank], tensors[f"base_model.model.{m}.lora_A.weight"].float())
        assert torch.equal(bt_stack[1 : 1 + mod.rank], tensors[f"base_model.model.{m}.lora_B.weight"].float().T)
        assert a_stack[0].isnan().all() and a_stack[-1].isnan().all() and bt_stack[-1].isnan().all()  # nothing beyond
        a, b = ad.factors(m)
        assert a.dtype == torch.float16 and torch.equal(a, tensors[f"base_model.model.{m}.lora_A.weight"])
        with pytest.raises(ValueError, match="destination"):
            ad.read_into(m, torch.empty(mod.rank + 1, mod.in_features), torch.empty(mod.out_features, mod.rank))


# -- the float32 factorisation of large stacks ------------------------------------------------------------
def _terms(d: int, ranks: list[int], seed: int = 0, near_copy: bool = False):
    from loramix.compose import LoraFactors, Term

    g = torch.Generator().manual_seed(seed)
    factors = [LoraFactors(torch.randn(r, d, generator=g), torch.randn(d, r, generator=g)) for r in ranks]
    if near_copy:  # a second entry whose subspaces nearly coincide with the first's
        f = factors[0]
        factors[1] = LoraFactors(f.a + 1e-5 * torch.randn(f.a.shape, generator=g), f.b + 1e-5 * torch.randn(f.b.shape, generator=g))
    weights = torch.rand(len(ranks), generator=g)
    return [Term(f, float(w), 0.5) for f, w in zip(factors, weights)]


def _dense_terms(terms) -> torch.Tensor:
    return sum(t.coefficient * t.scale * (t.factors.b.double() @ t.factors.a.double()) for t in terms)


@pytest.mark.parametrize("near_copy", [False, True])
def test_float32_stacks_take_the_cholesky_path_unless_ill_conditioned(monkeypatch, near_copy):
    import importlib

    from loramix.adapter import LoraModule

    comp_mod = importlib.import_module("loramix.compose.exact")
    monkeypatch.setattr(comp_mod, "EXACT_FLOAT64_MAX_ELEMENTS", 0)
    calls = {"cholesky": [], "eigen": 0}
    cholesky, eigen = comp_mod._cholesky_basis, comp_mod._eigen_basis

    def spy_cholesky(qt, blocks):
        calls["cholesky"].append(cholesky(qt, blocks) is not None)
        return None if not calls["cholesky"][-1] else cholesky(qt, blocks)

    def spy_eigen(qt):
        calls["eigen"] += 1
        return eigen(qt)

    monkeypatch.setattr(comp_mod, "_cholesky_basis", spy_cholesky)
    monkeypatch.setattr(comp_mod, "_eigen_basis", spy_eigen)
    terms = _terms(256, [8, 4, 8, 6, 8], near_copy=near_copy)
    ref = LoraModule("m", 8, 0.5, 256, 256)
    want = _dense_terms(terms)
    full = comp_mod.Exact().module(terms, ref, None)
    assert rel(full.b @ full.a, want) <= 1e-5
    s = torch.linalg.svdvals(want)
    cut = comp_mod.Exact().module(terms, ref, 6)
    assert float((cut.b @ cut.a - want).norm()) <= float(s[6:].norm()) * (1 + 1e-4)
    assert cut.energy == pytest.approx(float((s[:6] ** 2).sum() / (s**2).sum()), rel=1e-5)
    if near_copy:  # float32 Gram matrices too ill-conditioned: refused, and the module redone in float64
        assert calls["cholesky"][0] is False and calls["eigen"] > 0
    else:
        assert all(calls["cholesky"]) and calls["eigen"] == 0


def test_composition_does_not_depend_on_the_thread_count(mixed):
    b, c = mixed
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compose(b, c, rank=3)
        torch.set_num_threads(3)
        three = compose(b, c, rank=3)
        assert torch.get_num_threads() == 3  # restored after the parallel composition
    finally:
        torch.set_num_threads(threads)
    for m in b.shapes:
        assert torch.equal(one.factors[m][0], three.factors[m][0]) and torch.equal(one.factors[m][1], three.factors[m][1])


# -- the randomized range finder (stacked rank beyond EXACT_MAX_STACKED_RANK) -----------------------------
def _decaying_terms(d: int, entries: int, r: int, seed: int = 0):
    """Entries sharing a few strong directions (the sum has a decaying spectrum), as adapters trained on related
    tasks do, in float16 as most banks store them."""
    from loramix.compose import LoraFactors, Term

    g = torch.Generator().manual_seed(seed)
    common_a, common_b = torch.randn(4, d, generator=g), torch.randn(d, 4, generator=g)
    terms = []
    for i in range(entries):
        a = torch.cat([common_a * 3 + 0.3 * torch.randn(4, d, generator=g), 0.3 * torch.randn(r - 4, d, generator=g)])
        b = torch.cat([common_b * 3 + 0.3 * torch.randn(d, 4, generator=g), 0.3 * torch.randn(d, r - 4, generator=g)], 1)
        terms.append(Term(LoraFactors(a.half(), b.half()), float(torch.rand(1, generator=g)), 0.5))
    return terms


def test_randomized_truncation_is_near_optimal_and_thread_independent(monkeypatch):
    import importlib

    from loramix.adapter import LoraModule

    comp_mod = importlib.import_module("loramix.compose.exact")
    terms = _decaying_terms(96, 40, 8)  # stacked rank 320, a range of 4 + 16 = 20 columns out of 96
    ref = LoraModule("m", 8, 0.5, 96, 96)
    want = _dense_terms(terms)
    s = torch.linalg.svdvals(want)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(comp_mod.Exact._randomized(terms, ref, 4, comp_mod.Workspace()))
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(threads)
    one, three = results
    assert torch.equal(one.a, three.a) and torch.equal(one.b, three.b)  # the same bytes at any thread count
    assert float((one.b @ one.a - want).norm()) <= float(s[4:].norm()) * (1 + 1e-3)  # Eckart-Young's optimum
    # the range's dtype (bfloat16 where the CPU has it) only tilts the range: float32 gives the same truncation
    monkeypatch.setattr(comp_mod, "_range_dtype", lambda: torch.float32)
    f32 = comp_mod.Exact._randomized(terms, ref, 4, comp_mod.Workspace())
    assert rel(f32.b.double() @ f32.a.double(), one.b.double() @ one.a.double()) <= 1e-4
    assert one.singular_values[:4] == pytest.approx(f32.singular_values[:4], rel=1e-5)


@pytest.mark.parametrize("value,where", [(float("nan"), "lora_A"), (float("inf"), "lora_B"), (float("-inf"), "lora_A")])
def test_randomized_path_reads_the_bank_and_names_an_entry_with_non_finite_weights(tmp_path, monkeypatch, value, where):
    """Beyond the stacked-rank limit, factors are read from disk straight into reused stacks and not checked one by
    one: the result of the first application of M is, and a NaN or Inf anywhere (any entry, A or B, any position)
    still stops the composition with the entry and module named."""
    import importlib

    from safetensors.torch import load_file, save_file

    from loramix.compose import LoraFactors, Term

    comp_mod = importlib.import_module("loramix.compose.exact")
    monkeypatch.setattr(comp_mod, "EXACT_MAX_STACKED_RANK", 4)  # every module of the bank goes randomized
    calls = []
    randomized = comp_mod.Exact._randomized
    monkeypatch.setattr(comp_mod.Exact, "_randomized", staticmethod(lambda *a: calls.append(1) or randomized(*a)))
    bank = Bank(make_bank(tmp_path / "bank", n=6, mixed=True))
    c = {e.name: 0.1 + 0.1 * i for i, e in enumerate(bank.entries)}
    clean = compose(bank, c, rank=3)
    assert len(calls) == len(bank.shapes)
    in_memory = comp_mod.Exact()
    for m in sorted(bank.shapes):  # the same bytes as from factors held in memory, with a fresh workspace each
        terms = [Term(LoraFactors(*e.adapter.factors(m)), c[e.name], e.adapter.modules[m].scale) for e in bank.entries if m in e.adapter.modules]
        r = in_memory.module(terms, next(e.adapter.modules[m] for e in bank.entries if m in e.adapter.modules), 3)
        assert torch.equal(r.a.to(clean.factors[m][0].dtype), clean.factors[m][0])
    victim = bank.entries[3]
    f = victim.adapter.path / "adapter_model.safetensors"
    tensors = {k: t.clone() for k, t in load_file(f).items()}  # load_file maps the file, rewritten below
    key = sorted(k for k in tensors if where in k)[-1]
    g = torch.Generator().manual_seed(1)
    t = tensors[key].clone()
    t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = value
    tensors[key] = t
    save_file(tensors, f)
    module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    with pytest.raises(LoramixError, match=f"{victim.name}: module '{module}' has NaN or Inf weights"):
        compose(Bank(bank.path), c, rank=3)
