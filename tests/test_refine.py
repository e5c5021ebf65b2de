"""Refining coefficients on a few labelled examples."""

import numpy as np
import pytest
import torch
from helpers import make_bank, topic_records, write_jsonl

from loramix import Bank, compose, generate, read_dataset, read_report
from loramix.refine import RefineConfig, refine
from loramix.runtime.lora import MixedLoRA


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
    generate(bank, data, tmp_path / "out", refine=4, refine_method="gradient", top_k=3, max_samples=8, rank="full",
             refine_per_layer=True, check=0)
    r = read_report(tmp_path / "out").refine
    assert r.layers is not None and set(r.layers) == {"0", "1"} and r.loss <= r.initial_loss
    assert all(len(v) <= 3 for v in r.layers.values())


def test_check_scales_every_layer_of_a_per_layer_composition(tmp_path, tiny_base):
    """check(layers=...) scores 'x<s>' with s times the per-layer weights (the hooks' [layers, k] weights), and the
    layers it returns for a scaled winner are those weights; generate writes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramix.check import check
    from loramix.runtime.pytorch import answer_scores_fn

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
    assert res.candidates["x2"]["loss"] == pytest.approx(want.loss, rel=1e-5)
    flat = check(bank, mean, data, examples=4, scales=(2.0,), model=model, tokenizer=tok)
    assert flat.candidates["x2"]["loss"] != pytest.approx(want.loss, rel=1e-5)  # the mean weights are another composition
    if res.chosen == "x2":
        assert res.layers == {i: {n: 2 * w for n, w in row.items()} for i, row in layers.items()}
    else:
        assert res.layers is None

    out = tmp_path / "out"
    generate(bank.path, write_jsonl(tmp_path / "u.jsonl", topic_records("fruits", 20)), out, refine=4, check=4,
             refine_method="gradient", top_k=3, max_samples=8, rank="full", refine_per_layer=True)
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


def test_a_gradient_search_spends_one_forward_pass_a_step_and_returns_the_best_point_seen(tmp_path, tiny_base):
    """No forward pass beyond the steps (the start's loss is the first step's, the result is a point already
    evaluated), and the loss reported for the returned weights is theirs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramix.refine import search_weights
    from loramix.runtime.pytorch import answer_loss_fn

    bank = Bank(make_bank(tmp_path / "bank", n=3, base=str(tiny_base)))
    samples = read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 10))).samples[:4]
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        answer_loss_fn(model, tok, samples)()
    per_loss, calls[:] = len(calls), []  # model calls of one loss (the shared prefix runs apart)
    cfg = RefineConfig(steps=5, lr=0.2, l1=0.0)
    w0 = np.full(3, 1 / 3)
    w, initial, final, history = search_weights(model, tok, bank, bank.entries, w0, samples, cfg)
    hook.remove()
    assert len(history) == 5 and len(calls) == 5 * per_loss
    assert initial == history[0] and final == min(history) <= initial
    mixed = MixedLoRA(model, bank, bank.entries)
    mixed.weights = torch.tensor(w, dtype=torch.float32)
    with torch.no_grad():
        assert float(answer_loss_fn(model, tok, samples)()) == pytest.approx(final, rel=1e-5)
    mixed.remove()


def test_refine_budget_starts_no_step_that_would_end_past_it(tmp_path, tiny_base, monkeypatch):
    """With steps of a (simulated) second each, a 3.5 s budget runs 3 steps: a fourth would end at 4 s."""
    import loramix.refine as refine_module

    clock = [0.0]
    monkeypatch.setattr(refine_module.time, "perf_counter", lambda: clock[0])
    bank = Bank(make_bank(tmp_path / "bank", n=3, base=str(tiny_base)))
    data = read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 10)))
    loss = refine_module.answer_loss_fn

    def slow(*args, **kwargs):
        fn = loss(*args, **kwargs)

        def tick():
            clock[0] += 1.0
            return fn()

        return tick

    monkeypatch.setattr(refine_module, "answer_loss_fn", slow)
    r = refine(bank, {e.name: 1 / 3 for e in bank.entries}, data, RefineConfig(steps=50, budget=3.5))
    assert r.steps == 3


def test_generate_with_refine_records_the_search(tmp_path, tiny_base):
    bank = make_bank(tmp_path / "bank", n=5, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 20))
    generate(bank, data, tmp_path / "out", refine=4, refine_method="gradient", top_k=3, max_samples=8, rank="full",
             check=0, refine_per_layer=False)
    report = read_report(tmp_path / "out")
    r = report.refine
    assert r.examples == 4 and r.method == "gradient" and r.loss <= r.initial_loss and r.layers is None
    assert sum(1 for v in r.meta_coefficients.values() if v > 0) == 3
    assert report.coefficients != r.meta_coefficients
    generate(bank, data, tmp_path / "layers", refine=4, refine_method="gradient", top_k=3, max_samples=8, rank="full",
             check=0)
    assert read_report(tmp_path / "layers").refine.layers is not None  # per layer by default (README, What each stage offers)


@pytest.mark.parametrize("n", [1, 6])
def test_shared_prefix_scores_equal_the_plain_ones(tiny_base, n):
    """Loss, token accuracy and exact match through the shared-prefix cache equal those of the plain batch (one
    sample included: its prefix must stop before the answer's preceding token)."""
    from loramix.data import Dataset, Sample
    from loramix.runtime.pytorch import load_model, load_tokenizer
    from loramix.prompts import answer_batch, encode
    from loramix.runtime.pytorch import answer_loss_fn, answer_scores_fn

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
    from loramix.runtime.pytorch import load_model, load_tokenizer
    from loramix.prompts import end_of_turn_id, prompt_ids
    from loramix.runtime.pytorch import answer_scores_fn

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


def test_generate_refine_finetunes_the_composed_adapter(tmp_path, tiny_base):
    """--refine N (its default method, finetune): the adapter written is the composition trained on N examples, in
    the composition's dtype, for --refine-steps steps, recorded in loramix.json; no check by default; it loads in
    PEFT and differs from the composition alone. With an explicit check, training uses examples the check did not."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loramix.train_config import REFINE_TRAINING

    bank = make_bank(tmp_path / "bank", n=4, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 20))
    generate(bank, data, tmp_path / "plain", check=0, max_samples=8)
    generate(bank, data, tmp_path / "tuned", refine=6, max_samples=8)
    report = read_report(tmp_path / "tuned")
    ft = report.finetune
    assert report.check is None and report.refine is None
    assert ft.examples == 6 and ft.steps == REFINE_TRAINING.steps and ft.from_composition and ft.loss < ft.first_loss
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    tuned = load_file(tmp_path / "tuned" / "adapter_model.safetensors")
    assert {t.dtype for t in tuned.values()} == {t.dtype for t in plain.values()}
    assert plain.keys() == tuned.keys() and any(not torch.equal(plain[k], tuned[k]) for k in plain)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "tuned")
    assert read_report(tmp_path / "plain").finetune is None

    generate(bank, data, tmp_path / "checked", refine=6, refine_steps=3, check=4, max_samples=8)
    report = read_report(tmp_path / "checked")
    assert report.check.examples == 4 and report.finetune.steps == 3
    assert report.finetune.from_composition == report.check.beats_base
    assert report.finetune.max_tokens == REFINE_TRAINING.max_tokens  # the default limit, recorded


def test_refine_beyond_the_dataset_uses_and_reports_what_there_is(tmp_path, tiny_base, caplog):
    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    generate(bank, data, tmp_path / "out", refine=1000, refine_steps=1, max_samples=8)
    assert read_report(tmp_path / "out").finetune.examples == 6
    assert "refine 1000" in caplog.text and "has 6 examples; all of them are used" in caplog.text


def test_finetune_from_scratch_when_the_base_was_kept(tmp_path, tiny_base):
    """A zero update gets no gradient, so the base model's adapter is replaced by a freshly trained LoRA."""
    from loramix import GenerateConfig
    from loramix.refine import REFINE_METHODS

    finetune = REFINE_METHODS.get("finetune")().train

    bank = Bank(make_bank(tmp_path / "bank", n=3, base=str(tiny_base)))
    comp = compose(bank, {e.name: 1 / 3 for e in bank.entries})
    from loramix import save_adapter

    save_adapter(tmp_path / "ad", comp.config, comp.factors)
    data = read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 8)))
    info = finetune(tmp_path / "ad", bank, data, GenerateConfig(refine=8, refine_steps=5), from_composition=False)
    assert not info.from_composition and info.steps == 5 and info.examples == 8
    cut = finetune(tmp_path / "ad", bank, data, GenerateConfig(refine=8, refine_steps=5, refine_max_tokens=1),
                   from_composition=False)
    assert cut.steps == 1 and cut.max_tokens == 1  # a limit below one batch's tokens: one step


@pytest.mark.parametrize("kw,message", [
    ({"refine": -1}, "refine must be at least 0"),
    ({"refine": 4, "refine_budget": 0.0}, "positive number of seconds"),
    ({"refine": 4, "refine_steps": 0}, "refine_steps must be at least 1"),
    ({"refine": 4, "refine_max_tokens": -1}, "refine_max_tokens must be at least 0"),
    ({"refine": 4, "refine_method": "nope"}, "unknown refine method 'nope'; choose one of: finetune, gradient"),
])
def test_refine_options_are_validated(kw, message):
    from loramix import GenerateConfig
    from loramix.errors import LoramixError

    with pytest.raises(LoramixError, match=message):
        GenerateConfig(**kw)


def test_check_defaults_to_none_with_refine():
    """--check's default holds out 16 examples, none when refinement is asked for (--refine N, or auto: 16 unless a
    check is chosen); an explicit --check is kept either way, and turns auto refinement off."""
    from loramix import GenerateConfig

    assert GenerateConfig().refine_examples == 16 and GenerateConfig().check_examples == 0
    assert GenerateConfig(refine=0).check_examples == 16 and GenerateConfig(refine=16).check_examples == 0
    assert GenerateConfig(refine=16, check=8).check_examples == 8 and GenerateConfig(check=0).check_examples == 0
    assert GenerateConfig(check=8).refine_examples == 0 and GenerateConfig(check=0).refine_examples == 0
    assert GenerateConfig(refine="4").refine == 4
    from loramix.errors import LoramixError

    with pytest.raises(LoramixError, match="refine must be an integer or 'auto'"):
        GenerateConfig(refine="some")


def test_cli_generate_refine_says_what_it_trained(tmp_path, tiny_base):
    """`loramix generate --refine N` prints the fine-tune (examples, steps, loss) and runs no check by default."""
    from typer.testing import CliRunner

    from loramix.cli import app

    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 12))
    res = CliRunner().invoke(app, ["generate", "-b", str(bank), "-d", str(data), "-o", str(tmp_path / "out"),
                                   "--refine", "6", "--refine-steps", "2", "--max-samples", "8"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "fine-tuned from the composition on 6 examples (2 steps" in text and "checked on" not in text


@pytest.mark.parametrize("method", ["finetune", "gradient"])
def test_refine_too_slow_for_this_cpu_is_refused_before_it_starts(tmp_path, tiny_base, monkeypatch, method):
    """--refine whose estimated time (a step's batch timed on the base, times the steps) exceeds the limit without
    --budget, or whose one step exceeds --budget, is refused in one line before anything is written;
    within both it runs."""
    import loramix.refine as refine_module
    from loramix.errors import LoramixError

    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 12))
    monkeypatch.setattr(refine_module, "REFINE_LIMIT", 1e-9)
    with pytest.raises(LoramixError, match=rf"refine=4 \(refine_method={method}, 2 steps of about .* s\) on the "
                                           r"bank's base model: about .* s on this CPU: refine_budget=SECONDS caps it"):
        generate(bank, data, tmp_path / "out", refine=4, refine_method=method, refine_steps=2, check=0, max_samples=8)
    with pytest.raises(LoramixError, match="one step is more than refine_budget=1e-09"):
        generate(bank, data, tmp_path / "out", refine=4, refine_method=method, refine_steps=2, refine_budget=1e-9,
                 check=0, max_samples=8)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(refine_module, "REFINE_LIMIT", 600.0)
    generate(bank, data, tmp_path / "out", refine=4, refine_method=method, refine_steps=2, check=0, max_samples=8)
    assert (tmp_path / "out" / "loramix.json").is_file()


def test_check_scores_adapter_files_when_the_exact_mix_would_not_fit(tmp_path, tiny_base, monkeypatch):
    """When the bank's factors mixed exactly would not fit in memory beside the base, the PyTorch check scores each
    candidate as the adapter it would be written as (the composition at its scales, entries alone, top-k): at full
    rank the same scores as the exact mix."""
    import loramix.check as check_module
    from loramix.check import check

    bank = Bank(make_bank(tmp_path / "bank", n=4, base=str(tiny_base)))
    data = read_dataset(write_jsonl(tmp_path / "u.jsonl", topic_records("fruits", 12)))
    weights = {e.name: w for e, w in zip(bank.entries, (0.5, 0.3, 0.2, -0.1))}
    kw = dict(examples=4, singles=2, tops=3, criterion="loss", rank="full")
    exact = check(bank, weights, data, **kw)
    monkeypatch.setattr(check_module, "available_bytes", lambda: 1)
    composed = check(bank, weights, data, **kw)
    assert set(composed.candidates) == set(exact.candidates) and len(exact.candidates) >= 7
    for label, score in exact.candidates.items():
        assert composed.candidates[label]["loss"] == pytest.approx(score["loss"], rel=1e-4), label
    assert composed.chosen == exact.chosen


def test_refine_auto_trains_where_it_fits_and_checks_where_it_does_not(tmp_path, tiny_base, monkeypatch):
    """By default `generate` trains the composition on 16 examples when the estimate fits AUTO_REFINE_SECONDS (no
    check), else it checks instead; loramix.json says which and why."""
    import loramix.pipeline

    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 24))
    generate(bank, data, tmp_path / "auto", max_samples=8)
    report = read_report(tmp_path / "auto")
    assert report.finetune is not None and report.finetune.examples == 16 and report.check is None
    assert report.refine_plan.startswith("refined: refine=16 (refine_method=finetune") and report.config.refine == "auto"
    monkeypatch.setattr(loramix.pipeline, "AUTO_REFINE_SECONDS", 1e-9)
    generate(bank, data, tmp_path / "slow", max_samples=8, check_criterion="loss")
    report = read_report(tmp_path / "slow")
    assert report.finetune is None and report.check is not None and report.check.examples == 16
    assert report.refine_plan.startswith("not refined: refine=16") and "checked instead" in report.refine_plan
