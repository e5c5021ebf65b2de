"""Refining coefficients on a few labelled examples."""

import numpy as np
import pytest
import torch
from helpers import make_bank, topic_records, write_jsonl

from loramix import Bank, compose, generate, read_dataset, read_report
from loramix.refine import MixedLoRA, RefineConfig, refine


def peft_logits(base_dir, comp, tmp_path, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramix import save_adapter

    save_adapter(tmp_path / "ad", comp.config, comp.factors)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("mode,mixed", [("exact", True), ("paper", False)])
def test_hooks_equal_the_composed_adapter(tmp_path, tiny_base, mode, mixed):
    from transformers import AutoModelForCausalLM

    bank = Bank(make_bank(tmp_path / "bank", n=4, base=str(tiny_base), mixed=mixed))
    w = np.array([0.5, -0.3, 0.9, 0.2])
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    hooked = MixedLoRA(model, bank, bank.entries, mode)
    hooked.weights = torch.tensor(w, dtype=torch.float32)
    with torch.no_grad():
        got = model(ids).logits
    hooked.remove()
    comp = compose(bank, {e.name: float(x) for e, x in zip(bank.entries, w)}, method=mode, **({"rank": "full"} if mode == "exact" else {}))
    assert torch.allclose(got, peft_logits(tiny_base, comp, tmp_path, ids), atol=1e-5)
    with torch.no_grad():  # hooks removed: the base model again
        assert torch.allclose(model(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_base).eval()(ids).logits)


def test_per_layer_hooks_equal_the_per_layer_composition(tmp_path, tiny_base):
    """Weights [layers, k] in the hooks give the logits of the adapter composed with those weights layer by layer."""
    from transformers import AutoModelForCausalLM

    bank = Bank(make_bank(tmp_path / "bank", n=3, base=str(tiny_base)))
    w = np.array([[0.5, -0.3, 0.9], [0.0, 1.2, -0.4]])  # layer 0, layer 1
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    hooked = MixedLoRA(model, bank, bank.entries)
    assert hooked.layers == [0, 1]
    hooked.weights = torch.tensor(w, dtype=torch.float32)
    with torch.no_grad():
        got = model(ids).logits
    hooked.remove()
    names = [e.name for e in bank.entries]
    layers = {i: dict(zip(names, map(float, row))) for i, row in enumerate(w)}
    comp = compose(bank, dict(zip(names, map(float, w.mean(0)))), rank="full", layers=layers)
    assert torch.allclose(got, peft_logits(tiny_base, comp, tmp_path, ids), atol=1e-5)
    one = compose(bank, layers[1], rank="full")  # layer 1 composed alone with its own weights
    for m in comp.factors:
        if ".1." in m:
            a, b = comp.factors[m]
            a1, b1 = one.factors[m]
            assert torch.allclose(b.double() @ a.double(), b1.double() @ a1.double(), atol=1e-5)


def test_per_layer_refinement_is_written_and_recorded(tmp_path, tiny_base):
    bank = make_bank(tmp_path / "bank", n=4, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 20))
    generate(bank, data, tmp_path / "out", refine=4, top_k=3, max_samples=8, rank="full", refine_per_layer=True, check=0)
    r = read_report(tmp_path / "out").refine
    assert r.layers is not None and set(r.layers) == {"0", "1"} and r.loss <= r.initial_loss
    assert all(len(v) <= 3 for v in r.layers.values())


def test_check_scales_every_layer_of_a_per_layer_composition(tmp_path, tiny_base):
    """check(layers=...) scores 'x<s>' with s times the per-layer weights (the hooks' [layers, k] weights), and the
    layers it returns for a scaled winner are those weights; generate writes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramix.calibrate import check
    from loramix.refine import answer_scores_fn

    bank = Bank(make_bank(tmp_path / "bank", n=3, base=str(tiny_base)))
    names = [e.name for e in bank.entries]
    layers = {0: dict(zip(names, [0.5, -0.3, 0.9])), 1: dict(zip(names, [0.0, 1.2, -0.4]))}
    mean = {n: (layers[0][n] + layers[1][n]) / 2 for n in names}
    data = read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 8)))
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)
    res = check(bank, mean, data, examples=4, scales=(2.0,), layers=layers, model=model, tokenizer=tok)
    hooked = MixedLoRA(model, bank, bank.entries)
    hooked.weights = 2 * torch.tensor([[layers[i][n] for n in names] for i in (0, 1)], dtype=torch.float32)
    want = answer_scores_fn(model, tok, data.subsample(4, 0).samples)()
    hooked.remove()
    assert res.scores["x2"].loss == pytest.approx(want.loss, rel=1e-5)
    flat = check(bank, mean, data, examples=4, scales=(2.0,), model=model, tokenizer=tok)
    assert flat.scores["x2"].loss != pytest.approx(want.loss, rel=1e-5)  # the mean weights are another composition
    if res.chosen == "x2":
        assert res.layers == {i: {n: 2 * w for n, w in row.items()} for i, row in layers.items()}
    else:
        assert res.layers is None

    out = tmp_path / "out"
    generate(bank.path, write_jsonl(tmp_path / "u.jsonl", topic_records("fruits", 20)), out, refine=4, check=4,
             top_k=3, max_samples=8, rank="full", refine_per_layer=True)
    report = read_report(out)
    assert report.check is not None and report.refine.layers is not None


@pytest.mark.parametrize("method", ["gradient", "nevergrad"])
def test_refine_lowers_the_loss_and_keeps_top_k(tmp_path, tiny_base, method):
    bank = Bank(make_bank(tmp_path / "bank", n=6, base=str(tiny_base)))
    data = read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 20)))
    c = {e.name: 1 / 6 for e in bank.entries}
    r = refine(bank, c, data, RefineConfig(examples=5, top_k=3, method=method, steps=15, lr=0.2))
    assert r.loss <= r.initial_loss and r.steps == 15
    assert sum(1 for v in r.coefficients.values() if v != 0) <= 3
    assert all(-1.5 <= v <= 1.5 for v in r.coefficients.values())


def test_refine_budget_stops_early(tmp_path, tiny_base):
    bank = Bank(make_bank(tmp_path / "bank", n=3, base=str(tiny_base)))
    data = read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 10)))
    r = refine(bank, {e.name: 1 / 3 for e in bank.entries}, data, RefineConfig(steps=500, budget=0.0))
    assert r.steps == 1


def test_generate_with_refine_records_the_search(tmp_path, tiny_base):
    bank = make_bank(tmp_path / "bank", n=5, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 20))
    generate(bank, data, tmp_path / "out", refine=4, top_k=3, max_samples=8, rank="full", check=0,
             refine_per_layer=False)
    report = read_report(tmp_path / "out")
    r = report.refine
    assert r.examples == 4 and r.method == "gradient" and r.loss <= r.initial_loss and r.layers is None
    assert sum(1 for v in r.meta_coefficients.values() if v > 0) == 3
    assert report.coefficients != r.meta_coefficients
    generate(bank, data, tmp_path / "layers", refine=4, top_k=3, max_samples=8, rank="full", check=0)
    assert read_report(tmp_path / "layers").refine.layers is not None  # per layer by default (README, Quality)


@pytest.mark.parametrize("n", [1, 6])
def test_shared_prefix_scores_equal_the_plain_ones(tiny_base, n):
    """Loss, token accuracy and exact match through the shared-prefix cache equal those of the plain batch (one
    sample included: its prefix must stop before the answer's preceding token)."""
    from loramix.data import Dataset, Sample
    from loramix.models import load_model, load_tokenizer
    from loramix.prompts import answer_batch, encode
    from loramix.refine import answer_loss_fn, answer_scores_fn

    model, tok = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    samples = [Sample(r["input"], tuple(r["output"])) for r in topic_records("animals", n)]
    ids, mask, targets = answer_batch(encode(tok, Dataset(samples, "x"), 64), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -targets.shape[1] - 1 : -1]
        plain = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        assert float(answer_loss_fn(model, tok, samples)()) == pytest.approx(float(plain), rel=1e-5)
    real = targets != -100
    hit = logits.argmax(-1) == targets
    got = answer_scores_fn(model, tok, samples)()
    assert got.loss == pytest.approx(float(plain), rel=1e-5)
    assert got.accuracy == pytest.approx(float(hit[real].float().mean()), abs=1e-6)
    assert got.exact == pytest.approx(float((hit | ~real).all(1).float().mean()), abs=1e-6)


def test_answer_scores_count_a_reproduced_answer_as_exact(tiny_base):
    """A sample whose answer is the model's own greedy continuation (ending where the model ends it) scores 1."""
    from loramix.data import Sample
    from loramix.models import load_model, load_tokenizer
    from loramix.prompts import end_of_turn_id, prompt_ids
    from loramix.refine import answer_scores_fn

    model, tok = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    prompt = prompt_ids(tok, "Name an animal.")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(3):  # force an answer of three greedy tokens, then check the end-of-turn is scored as a miss
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    answer = tok.decode(ids[0, len(prompt):])
    if tok(answer, add_special_tokens=False)["input_ids"] != ids[0, len(prompt):].tolist():
        pytest.skip("the tiny tokenizer does not round-trip these tokens")
    with torch.no_grad():
        eot_is_next = int(model(input_ids=ids).logits[0, -1].argmax()) == end_of_turn_id(tok)
    got = answer_scores_fn(model, tok, [Sample("Name an animal.", (answer,))])()
    assert got.accuracy >= 3 / 4 and got.exact == float(eot_is_next)
