"""The trainer, the evaluation harness and bank building, on the tiny model."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import topic_records, write_jsonl
from typer.testing import CliRunner

from loramix import Bank, read_dataset
from loramix.build import build_bank
from loramix.cli import app
from loramix.errors import LoramixError
from loramix.evaluate import evaluate
from loramix.runtime.scores import Scorer, normalize
from loramix.runtime.pytorch import load_tokenizer
from loramix.prompts import SharedBatch, answer_batch, encode
from loramix.train import TrainConfig, train

TINY = TrainConfig(steps=6, batch_size=4, lr=1e-2, rank=4, alpha=8, bf16=False)


def test_encode_and_batch_put_answers_last(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    ds = read_dataset(write_jsonl(tiny_base.parent / "d.jsonl", topic_records("colors", 3)))
    enc = encode(tok, ds, max_length=64)
    ids, n = enc[0]
    answer = tok(ds.samples[0].output, add_special_tokens=False)["input_ids"]
    assert ids[-n:] == answer + [tok.eos_token_id]
    x, mask, targets = answer_batch(enc, pad=tok.pad_token_id)
    assert x.shape == mask.shape and targets.shape[1] == max(k for _, k in enc)
    for row, (seq, k) in enumerate(enc):
        assert x[row, -len(seq):].tolist() == seq and mask[row].sum() == len(seq)
        assert targets[row, -k:].tolist() == seq[-k:] and (targets[row, :-k] == -100).all()


def test_shared_prefix_loss_and_gradients_equal_the_plain_batch(tmp_path, tiny_base):
    """Training's batch runs the shared prompt prefix once: its loss and its LoRA gradients equal those of running
    every row whole."""
    from peft import LoraConfig, get_peft_model

    from loramix.runtime.pytorch import load_model

    tok = load_tokenizer(str(tiny_base))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(load_model(str(tiny_base)), lora)
    enc = encode(tok, read_dataset(write_jsonl(tmp_path / "p.jsonl", topic_records("fruits", 5))), 64)
    ids, mask, targets = answer_batch(enc, pad=tok.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -targets.shape[1] - 1 : -1]
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(plain, params)
    batch = SharedBatch.of(enc, tok.pad_token_id)
    assert batch.prefix.shape[1] > 0 and batch.rest.shape[1] < ids.shape[1]
    shared = batch.loss(model)
    assert shared.item() == pytest.approx(plain.item(), rel=1e-5)
    for g, w in zip(torch.autograd.grad(shared, params), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_train_writes_a_peft_adapter(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", topic_records("fruits", 16))
    record = train(data, tmp_path / "ad", TINY, base=str(tiny_base))
    assert len(record["loss"]) == 6 and all(x == x for x in record["loss"])
    assert record["loss"][-1] < record["loss"][0]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(tiny_base)
    assert json.loads((tmp_path / "ad" / "training.json").read_text())["config"]["steps"] == 6
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "ad")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    # same seed, same adapter bytes
    train(data, tmp_path / "ad2", TINY, base=str(tiny_base))
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == (tmp_path / "ad2" / "adapter_model.safetensors").read_bytes()


def test_base_dtype_float32_when_it_fits_else_native_bfloat16(tiny_base, monkeypatch):
    """The base loads in float32 when it fits in the memory available, in bfloat16 when only that fits and the CPU
    runs it natively, and is refused in one line naming both estimates otherwise (decided before any load)."""
    from loramix.errors import LoramixError
    from loramix.runtime.pytorch import load_config, load_model
    from loramix.runtime import memory

    params = memory.parameter_count(load_config(str(tiny_base)))
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 2**30)
    assert load_model(str(tiny_base)).dtype == torch.float32
    monkeypatch.setattr(memory, "available_bytes", lambda: params * 3 + memory.OVERHEAD)
    for native in (True, False):
        monkeypatch.setattr(memory, "bf16_native", lambda device="cpu", native=native: native)
        if native:
            assert load_model(str(tiny_base)).dtype == torch.bfloat16
        else:
            with pytest.raises(LoramixError, match="float32 .*emulated.* GGUF"):
                load_model(str(tiny_base))
    monkeypatch.setattr(memory, "available_bytes", lambda: params)
    monkeypatch.setattr(memory, "bf16_native", lambda device="cpu": True)
    with pytest.raises(LoramixError, match=r"needs about .* in float32, .* in bfloat16, and .* available: run a GGUF"):
        load_model(str(tiny_base))


def test_bf16_autocast_only_where_it_is_native(tmp_path, tiny_base):
    """bf16 is used where the device computes it natively (oneDNN's test on a CPU) and training.json says which."""
    from loramix.runtime.memory import bf16_native

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert bf16_native(torch.device("cpu")) == native
    data = write_jsonl(tmp_path / "train.jsonl", topic_records("fruits", 8))
    record = train(data, tmp_path / "ad", replace(TINY, steps=1, bf16=True), base=str(tiny_base))
    assert record["autocast"] == ("bfloat16" if native else None)
    assert record["config"]["bf16"] is True  # the setting, as bank build compares it


def test_train_starts_from_an_init_adapter(tmp_path, tiny_base):
    """`init`: training starts from that adapter's factors (with lr 0 they come back unchanged, under its rank)."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "train.jsonl", topic_records("fruits", 8))
    train(data, tmp_path / "first", TINY, base=str(tiny_base))
    record = train(data, tmp_path / "again", replace(TINY, steps=2, lr=0.0, rank=2), base=str(tiny_base), init=tmp_path / "first")
    assert record["init"] == str(tmp_path / "first")
    before = load_file(tmp_path / "first" / "adapter_model.safetensors")
    after = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["r"] == TINY.rank


def test_scorer():
    s = Scorer()
    assert normalize("The  Cat!") == "cat"
    assert s("the cat", ("Cat",)) == (pytest.approx(2 / 3), 1.0, 1.0)  # ROUGE keeps articles, EM drops them
    assert s("Cat.", ("cat",)) == (1.0, 1.0, 1.0)
    rouge, em, contains = s("a big cat sat", ("dog", "cat"))
    assert rouge == pytest.approx(2 * (1 / 4 * 1) / (1 / 4 + 1)) and em == 0 and contains == 1
    assert s("élève", ("élève",))[0] == 1.0 and s("🍎", ("🍎",))[0] == 1.0
    assert s("running", ("runs",))[0] == 1.0  # Porter stemming
    assert s("", ("x",)) == (0.0, 0.0, 0.0)


def test_evaluate_on_tiny_model(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "test.jsonl", topic_records("music", 5))
    r = evaluate(data, base=str(tiny_base), max_new_tokens=4, batch_size=2)
    assert r["n"] == 5 and len(r["predictions"]) == 5
    assert {"rougeL", "exact_match", "contains"} <= set(r) and all(0 <= r[k] <= 1 for k in ("rougeL", "exact_match", "contains"))


def test_build_bank_is_resumable(tmp_path, tiny_base):
    suite = tmp_path / "suite"
    for topic in ("colors", "tools", "music"):
        (suite / f"t_{topic}").mkdir(parents=True)
        write_jsonl(suite / f"t_{topic}" / "train.jsonl", topic_records(topic, 8))
    status = build_bank(suite, tmp_path / "bank", exclude=("t_music",), config=TINY, base=str(tiny_base))
    assert status == {"t_colors": "trained", "t_tools": "trained"}
    bank = Bank(tmp_path / "bank")
    assert [e.name for e in bank.usable] == ["t_colors", "t_tools"]
    assert (tmp_path / "bank" / "t_colors" / "train.jsonl").read_bytes() == (suite / "t_colors" / "train.jsonl").read_bytes()
    seeds = {json.loads((tmp_path / "bank" / t / "training.json").read_text())["config"]["seed"] for t in status}
    assert len(seeds) == 2  # one seed per task
    assert build_bank(suite, tmp_path / "bank", exclude=("t_music",), config=TINY, base=str(tiny_base)) == {
        "t_colors": "kept", "t_tools": "kept"}
    write_jsonl(suite / "t_tools" / "train.jsonl", topic_records("tools", 9))
    assert build_bank(suite, tmp_path / "bank", exclude=("t_music",), config=TINY, base=str(tiny_base))["t_tools"] == "trained"


def test_cli_train_and_eval_json(tmp_path, tiny_base):
    runner = CliRunner()
    data = write_jsonl(tmp_path / "train.jsonl", topic_records("sports", 8))
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "ad"), "--base", str(tiny_base),
                            "--steps", "2", "--rank", "2", "--save-dtype", "float16"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "ad" / "adapter_model.safetensors").values()} == {torch.float16}
    r = runner.invoke(app, ["eval", "--data", str(data), "--adapter", str(tmp_path / "ad"), "--limit", "3",
                            "--max-new-tokens", "3", "--json", "--predictions", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["n"] == 3 and {"rougeL", "exact_match", "contains"} <= set(result)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(x["input"], x["references"]) for x in rows] == [(s.input, list(s.outputs)) for s in read_dataset(data).samples[:3]]
    assert all(isinstance(x["prediction"], str) for x in rows)


def test_shared_prefix_generation_equals_one_by_one(tiny_base):
    from loramix.evaluate import load_for_eval
    from loramix.runtime.pytorch import generate_answers
    from loramix.prompts import common_prefix

    assert common_prefix([[1, 2, 3], [1, 2, 4, 5]]) == 2 and common_prefix([[1, 2], [1, 2, 3]]) == 1
    model, tok = load_for_eval(str(tiny_base))
    inputs = [r["input"] for r in topic_records("animals", 6)] + ["cat dog", "red"]
    batched = generate_answers(model, tok, inputs, batch_size=8, max_new_tokens=5)
    single = [generate_answers(model, tok, [x], batch_size=1, max_new_tokens=5)[0] for x in inputs]
    assert batched == single and any(batched)


def test_merged_adapter_equals_peft_and_restores_the_base(tmp_path, tiny_base):
    from loramix.evaluate import load_for_eval, merged_adapter

    data = write_jsonl(tmp_path / "train.jsonl", topic_records("fruits", 16))
    train(data, tmp_path / "ad", TINY, base=str(tiny_base))
    model, tok = load_for_eval(str(tiny_base))
    ids = torch.tensor([tok("apple banana cherry")["input_ids"]])
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(ids).logits
        with merged_adapter(model, tmp_path / "ad") as m:
            merged = m(ids).logits
        peft_model, _ = load_for_eval(str(tiny_base), tmp_path / "ad")
        expected = peft_model(ids).logits
    assert torch.allclose(merged, expected, atol=1e-5) and not torch.allclose(merged, plain, atol=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_train_budget_shortens_the_schedule_to_fit(tmp_path, tiny_base):
    """With a budget the run stops in time and its learning rate still decays: far fewer steps than asked for."""
    from dataclasses import replace

    data = write_jsonl(tmp_path / "train.jsonl", topic_records("fruits", 16))
    record = train(data, tmp_path / "ad", replace(TINY, steps=100_000, warmup=2, budget=1.0), base=str(tiny_base))
    assert 2 < len(record["loss"]) < 100_000 and record["seconds"] < 3.0
    assert record["config"]["budget"] == 1.0
    assert "budget" not in json.loads(json.dumps(TINY.as_record()))  # unset: older training.json still match


def test_train_max_tokens_keeps_the_first_steps_that_fit(tmp_path, tiny_base):
    """The steps run are the planned batches whose token positions (shared prefix once) fit max_tokens: the same
    number and the same losses on every run, whatever the clock; at least one step however small the limit."""
    from loramix.prompts import pad_id
    from loramix.train import plan_batches

    data = read_dataset(write_jsonl(tmp_path / "train.jsonl", topic_records("fruits", 16)))
    tok = load_tokenizer(str(tiny_base))
    encoded = encode(tok, data, TINY.max_length)
    sizes = [SharedBatch.of([encoded[i] for i in b], pad_id(tok)).tokens for b in list(plan_batches(len(encoded), TINY))]
    assert len(sizes) == TINY.steps and all(t > 0 for t in sizes)
    limit = sum(sizes[:3]) + sizes[3] - 1
    config = replace(TINY, max_tokens=limit)
    first = train(data, tmp_path / "a", config, base=str(tiny_base))
    again = train(data, tmp_path / "b", config, base=str(tiny_base))
    assert len(first["loss"]) == 3 and first["loss"] == again["loss"]
    assert first["config"]["max_tokens"] == limit and "max_tokens" not in TINY.as_record()
    assert len(train(data, tmp_path / "c", replace(TINY, max_tokens=1), base=str(tiny_base))["loss"]) == 1
    with pytest.raises(LoramixError, match="max_tokens must be a positive whole number"):
        train(data, tmp_path / "d", replace(TINY, max_tokens=0), base=str(tiny_base))


@pytest.mark.parametrize("budget", [0.0, -5.0, float("nan")])
def test_train_refuses_a_budget_that_is_not_positive(tmp_path, tiny_base, budget):
    from dataclasses import replace

    from loramix.errors import LoramixError

    data = write_jsonl(tmp_path / "train.jsonl", topic_records("fruits", 8))
    with pytest.raises(LoramixError, match="budget must be a positive number"):
        train(data, tmp_path / "ad", replace(TINY, budget=budget), base=str(tiny_base))
    assert not (tmp_path / "ad").exists()
