"""End to end: generate on small banks, load the result with PEFT, check the update it applies."""

import json

import pytest
import torch
from helpers import TOPICS, make_bank, topic_records, write_jsonl

import loramix
from loramix import Bank, LoramixError, generate, read_report


def peft_deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """Per module, the update PEFT applies: scaling * lora_B @ lora_A, read off the loaded PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            a = module.lora_A["default"].weight.double()
            b = module.lora_B["default"].weight.double()
            out[key] = module.scaling["default"] * (b @ a)
    return out


def expected_deltas(bank_dir, coefficients) -> dict[str, torch.Tensor]:
    bank = Bank(bank_dir)
    out = {}
    for m, shape in bank.shapes.items():
        total = torch.zeros(shape, dtype=torch.float64)
        for e in bank.entries:
            if m in e.adapter.modules and coefficients.get(e.name):
                total += coefficients[e.name] * e.adapter.delta(m)
        out[m] = total
    return out


@pytest.fixture
def user_data(tmp_path):
    return write_jsonl(tmp_path / "fruit_task.jsonl", topic_records("fruits", n=30, seed=99))


def test_generate_full_rank_matches_coefficients_in_peft(tmp_path, tiny_base, mixed_bank, user_data):
    out = tmp_path / "out"
    result = generate(mixed_bank, user_data, out, rank="full", check=0)
    report = read_report(out)
    assert set(report.coefficients) == {f"task_{t}" for t in list(TOPICS)[:8]}
    assert sum(report.coefficients.values()) == pytest.approx(1.0)
    assert all(c >= 0 for c in report.coefficients.values())
    written = json.loads((out / "loramix.json").read_text())
    for key in ("signature", "config", "rank", "energy", "bank", "loramix_version"):
        assert key in written
    assert {"distance", "operator", "compose", "check", "refine"} <= set(written["config"])  # the settings it ran with
    assert written["config"]["rank"] == "full" and report.config.rank == "full"
    assert report.loramix_version == loramix.__version__
    # the task closest in meaning gets the largest weight
    assert result.top(1)[0][0] == "task_fruits"
    got = peft_deltas(tiny_base, out)
    want = expected_deltas(mixed_bank, report.coefficients)
    assert set(got) == set(want)
    for m in want:
        assert float((got[m] - want[m]).norm() / want[m].norm()) <= 1e-5, m


def test_generate_truncated_in_peft_and_forward(tmp_path, tiny_base, mixed_bank, user_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    generate(mixed_bank, user_data, out, rank=4, top_k=3, check=0)
    report = read_report(out)
    assert sum(1 for c in report.coefficients.values() if c > 0) == 3
    assert 0 < report.energy.min <= report.energy.mean <= 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
    # forward pass: PEFT model == base with the composed update merged by hand
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    deltas = peft_deltas(tiny_base, out)
    with torch.no_grad():
        for name, mod in merged.named_modules():
            if name in deltas:
                mod.weight += deltas[name].float()
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-5)


def test_generate_paper_mode_and_unigram(tmp_path, tiny_base, user_data):
    bank_dir = make_bank(tmp_path / "bank", base=str(tiny_base))
    out = tmp_path / "out"
    generate(bank_dir, user_data, out, signature="unigram", distance="kl", operator="attentional", compose="paper", check=0)
    report = read_report(out)
    assert report.signature.method == "unigram" and report.signature.model == str(tiny_base)
    got = peft_deltas(tiny_base, out)
    bank = Bank(bank_dir)
    c = report.coefficients
    for m in bank.shapes:  # paper: (sum c_i B_i)(sum c_i A_i) * s
        a = sum(c[e.name] * e.adapter.factors(m)[0].double() for e in bank.entries)
        b = sum(c[e.name] * e.adapter.factors(m)[1].double() for e in bank.entries)
        assert torch.allclose(got[m], 2.0 * (b @ a), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("signature,distance", [("embed", "sliced"), ("embed", "mmd-rbf"), ("embed", "gaussian-w2"), ("hidden", "w2")])
def test_generate_other_signatures_and_distances(tmp_path, tiny_base, user_data, signature, distance):
    bank_dir = make_bank(tmp_path / "bank", base=str(tiny_base))
    generate(bank_dir, user_data, tmp_path / "out", signature=signature, distance=distance, max_samples=16, check=0)
    report = read_report(tmp_path / "out")
    assert report.distance == distance and sum(report.coefficients.values()) == pytest.approx(1.0)


def test_generate_neural_operator_is_fitted_and_cached(tmp_path, user_data):
    bank_dir = make_bank(tmp_path / "bank")
    generate(bank_dir, user_data, tmp_path / "o1", operator="neural", max_samples=16, check=0)
    cached = list((bank_dir / ".loramix" / "operators").glob("neural.*.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    generate(bank_dir, user_data, tmp_path / "o2", operator="neural", max_samples=16, check=0)
    assert cached[0].stat().st_mtime_ns == mtime
    assert read_report(tmp_path / "o1").coefficients == read_report(tmp_path / "o2").coefficients


def test_generate_does_not_load_base_for_embed(tmp_path, user_data):
    """The bank names a base model that does not exist: embed + compose must never try to load it."""
    bank_dir = make_bank(tmp_path / "bank", base="/nonexistent/7b-model")
    generate(bank_dir, user_data, tmp_path / "out", max_samples=16, check=0)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_generate_is_deterministic(tmp_path, bank, user_data):
    generate(bank, user_data, tmp_path / "a", max_samples=16, distance="sliced", check=0)
    generate(bank, user_data, tmp_path / "b", max_samples=16, distance="sliced", check=0)
    for f in ("adapter_model.safetensors", "adapter_config.json", "loramix.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.slow
def test_generate_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path, bank, user_data):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LoramixError, match="already exists"):
        generate(bank, user_data, out, check=0)
    generate(bank, user_data, out, force=True, max_samples=16, check=0)
    assert (out / "loramix.json").is_file()
    with pytest.raises(LoramixError, match="distance 'kl' compares tokens"):
        generate(bank, user_data, tmp_path / "bad", distance="kl", check=0)
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_generate_data_mode_excludes_entries_without_data(tmp_path, user_data, caplog):
    bank_dir = make_bank(tmp_path / "bank", n=4)
    (bank_dir / "task_animals" / "train.jsonl").unlink()
    generate(bank_dir, user_data, tmp_path / "out", max_samples=16, check=0, entry_signatures="data")
    report = read_report(tmp_path / "out")
    assert "task_animals" not in report.coefficients and report.excluded == ["task_animals"]
    assert report.entry_signatures == "data" and report.probed == []
    assert any("task_animals" in r.message and "no train.jsonl (1 of 4 entries)" in r.message for r in caplog.records)


def test_generate_unknown_names_are_one_line_errors(tmp_path, bank, user_data):
    for kwargs, pattern in [
        ({"signature": "nope"}, "unknown signature 'nope'"),
        ({"distance": "nope"}, "unknown distance 'nope'"),
        ({"operator": "nope"}, "unknown operator 'nope'"),
        ({"compose": "nope"}, "unknown composition 'nope'"),
        ({"rank": "half"}, "rank must be"),
    ]:
        with pytest.raises(LoramixError, match=pattern) as info:
            generate(bank, user_data, tmp_path / "out", check=0, **kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("operator", ["normalized", "neural"])
def test_leave_one_out_matches_one_by_one(tmp_path, operator):
    from safetensors.torch import load_file

    from loramix import compose
    from loramix.pipeline import leave_one_out

    bank_dir = make_bank(tmp_path / "bank", n=6)
    c = leave_one_out(bank_dir, tmp_path / "loo", operator=operator, top_k=3, rank=5, max_samples=8)
    bank = Bank(bank_dir)
    names = [e.name for e in bank.usable]
    assert c.shape == (6, 6) and (c.diagonal() == 0).all() and c.sum(1) == pytest.approx(1)
    assert ((c > 0).sum(1) == 3).all()
    for t, name in enumerate(names):
        report = read_report(tmp_path / "loo" / name)
        assert report.leave_one_out == name and report.coefficients[name] == 0 and name not in report.distances
        want = compose(bank, {n: float(x) for n, x in zip(names, c[t]) if x > 0}, rank=5)
        got = load_file(tmp_path / "loo" / name / "adapter_model.safetensors")
        for m, (a, b) in want.factors.items():
            assert torch.equal(got[f"base_model.model.{m}.lora_A.weight"], a)
            assert torch.equal(got[f"base_model.model.{m}.lora_B.weight"], b)


def test_generate_times_its_stages(tmp_path, bank, user_data):
    from loramix.pipeline import STAGES

    result = generate(bank, user_data, tmp_path / "out", max_samples=16, check=0)
    assert list(result.seconds) == [s for s in STAGES if s in result.seconds]  # in order
    assert {"open", "signature", "distances", "coefficients", "compose"} <= set(result.seconds)
    assert "check" not in result.seconds and all(v >= 0 for v in result.seconds.values())
