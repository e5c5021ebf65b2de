"""The llama.cpp runtime on the default base's shipped GGUF (Q4_1) and on a tiny synthetic GGUF (benchmarks/
synthetic_base.py): batched answers equal one-by-one answers, LoRAs at runtime scales, teacher-forced scores that agree
with PyTorch on the same weights, the check, eval and try on llama.cpp, GGUF bases from a path or the hub cache, and
the bad inputs (a LoRA GGUF as the base, a truncated file, an unknown architecture, a base larger than memory, a
bank whose shapes do not fit) refused in one line."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import TINY_SHAPES, make_bank
from test_errors import run_cli
from test_hub import cache_repo

import loramix
from loramix.data import read_dataset
from loramix.errors import LoramixError
from loramix.evaluate import evaluate
from loramix.paths import DEFAULT_SUITE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import synthetic_base  # noqa: E402

pytestmark = pytest.mark.slow
TASK = "freedict_eng_deu"  # a demo task: the default bank has not seen it


@pytest.fixture(scope="module")
def engine():
    from loramix.runtime.llamacpp import open_base

    with open_base(None) as e:
        yield e


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return synthetic_base.write(tmp_path_factory.mktemp("gguf") / "tiny.gguf", synthetic_base.TINY)


@pytest.fixture(scope="module")
def entry_gguf(tmp_path_factory) -> Path:
    """The default bank's numbers_french entry as a GGUF LoRA."""
    from loramix.runtime.llamacpp import gguf_lora

    with gguf_lora(loramix.Bank("default").entry("numbers_french").adapter.path, None) as path:
        kept = tmp_path_factory.mktemp("lora") / path.name
        shutil.copy(path, kept)
    return kept


def test_batched_answers_are_those_of_each_prompt_alone(engine):
    """Several prompts in one batch (their shared prefix decoded once, its cells shared) are run as each alone: the
    same prompt twice in a batch answers twice the same, a batch answers the same every time and at any thread count,
    and each prompt's next-token logits in the batch match those it gets alone (llama.cpp's kernels differ with the
    batch size, so not to the last bit: correlation above 0.995, as between llama.cpp and PyTorch). Streaming gives the answer of the prompt alone."""
    import numpy as np

    from loramix.prompts import prompt_ids
    from loramix.runtime.llamacpp import open_base

    prompts = [s.input for s in read_dataset(DEFAULT_SUITE / TASK / "test.jsonl").samples[:5]] + ["Name three colors."]
    together = engine.answers(prompts + prompts[:1], max_new_tokens=12, progress=False)
    assert together[0] == together[-1] and all(together)
    assert engine.answers(prompts, max_new_tokens=12, progress=False) == together[:-1]
    with open_base(None, threads=1) as one:
        assert one.answers(prompts, max_new_tokens=12, progress=False) == together[:-1]
    encoded = [prompt_ids(engine.tokenizer, p) for p in prompts]
    batched = engine._prefill(encoded, [[len(s) - 1] for s in encoded])
    for ids, rows in zip(encoded, batched):
        alone = engine._prefill([ids], [[len(ids) - 1]])[0]
        assert np.corrcoef(rows[-1], alone[-1])[0, 1] > 0.995
    alone = engine.answers(prompts[-1:], max_new_tokens=12, progress=False)[0]
    assert "".join(engine.stream(prompts[-1], max_new_tokens=12)).strip() == alone


def test_lora_scales_change_without_reloading(engine, entry_gguf):
    """Scale 0 is the base; a LoRA changes the answers; scales switch back and forth without reloading anything, and a
    scale gives the same answers whenever it is applied."""
    from loramix.runtime.llamacpp import Lora

    prompts = [s.input for s in read_dataset(DEFAULT_SUITE / "numbers_french" / "test.jsonl").samples[:4]]
    base = engine.answers(prompts, max_new_tokens=8, progress=False)
    at = {s: engine.answers(prompts, lora=Lora(entry_gguf, s), max_new_tokens=8, progress=False) for s in (0.0, 1.0, 2.0)}
    assert at[0.0] == base and at[1.0] != base and at[2.0] != at[1.0]
    assert engine.answers(prompts, lora=Lora(entry_gguf, 1.0), max_new_tokens=8, progress=False) == at[1.0]
    assert len(engine._adapters) == 1


def test_scores_agree_with_pytorch_on_the_same_weights(engine, entry_gguf):
    """Teacher-forced loss and accuracy on llama.cpp (Q4_1 weights) within a few percent of PyTorch on the same weights
    dequantized, for the base and with an entry's LoRA; ROUGE-L of the greedy answers computed as PyTorch's."""
    from loramix.runtime.pytorch import load_model, load_tokenizer
    from loramix.runtime.pytorch import answer_scores_fn
    from loramix.runtime.llamacpp import Lora

    samples = read_dataset(DEFAULT_SUITE / "numbers_french" / "train.jsonl").samples[:8]
    model, tokenizer = load_model(None), load_tokenizer(None)
    torch_base = answer_scores_fn(model, tokenizer, samples, generate=True)()
    ours = engine.scores(samples, generate=True)
    assert ours.loss == pytest.approx(torch_base.loss, rel=0.05)
    assert ours.accuracy == pytest.approx(torch_base.accuracy, abs=0.06)
    tuned = engine.scores(samples, lora=Lora(entry_gguf, 1.0), generate=True)
    assert tuned.loss < ours.loss and tuned.rouge > ours.rouge


def test_generate_checks_on_llamacpp_and_says_so(tmp_path):
    """generate --runtime llama.cpp: the check's candidates are scored on llama.cpp, loramix.json names the runtime and
    the check's plan; the check keeps the same candidate as on PyTorch here, with scores close to PyTorch's."""
    data = DEFAULT_SUITE / TASK / "train.jsonl"
    # a budget no machine exceeds: what is tested is where the check runs, not how it is planned (test below)
    ours = loramix.generate("default", data, tmp_path / "cpp", runtime="llama.cpp", check_budget=1e6)
    theirs = loramix.generate("default", data, tmp_path / "torch", check_budget=1e6, refine=0)
    report = json.loads((tmp_path / "cpp" / "loramix.json").read_text())
    assert report["check"]["runtime"] == "llama.cpp" and report["check_plan"]["mode"] == "full"
    assert report["refine_plan"].startswith("not refined: the base runs on llama.cpp")  # refinement trains on PyTorch
    assert theirs.report.check.runtime == "torch"
    assert ours.report.check.chosen == theirs.report.check.chosen
    for label, s in ours.report.check.candidates.items():
        assert s["loss"] == pytest.approx(theirs.report.check.candidates[label]["loss"], rel=0.05)


def test_check_auto_fits_its_budget_or_says_why(tmp_path):
    """--check auto with a budget too small for the full check runs a cheaper form or none, and loramix.json says which
    and why; an explicit --check N runs as asked."""
    data = DEFAULT_SUITE / TASK / "train.jsonl"
    small = loramix.generate("default", data, tmp_path / "a", runtime="llama.cpp", check_budget=0.001)
    plan = small.report.check_plan
    assert plan.mode == "skipped" and plan.examples == 0 and "check_budget" in plan.why and small.report.check is None
    asked = loramix.generate("default", data, tmp_path / "b", runtime="llama.cpp", check=4, check_singles=0,
                             check_criterion="loss", check_budget=0.001)
    assert asked.report.check_plan.mode == "as asked" and asked.report.check.examples == 4


def test_plan_check_prefers_forward_passes_then_fewer_candidates_to_fewer_examples():
    from loramix.check import plan_check
    from loramix.runtime import Speed
    from loramix.data import Dataset
    from loramix.runtime.pytorch import load_tokenizer

    held = read_dataset(DEFAULT_SUITE / TASK / "train.jsonl")
    tok = load_tokenizer(None)
    slow = Speed(tokens_per_second=50.0, seconds_per_step=0.5)
    cost = {g: slow.seconds(held.subsample(16, 1).samples, tok, g) for g in (True, False)}
    kw = dict(examples=16, criterion="rouge", singles=4, tops=0, scales=(0.5, 1, 1.5, 2), seed=1)
    assert plan_check(held, tok, slow, budget=9 * cost[True] + 1, **kw).mode == "full"
    reduced = plan_check(held, tok, slow, budget=9 * cost[False] + 1, **kw)
    assert (reduced.mode, reduced.examples, reduced.criterion, reduced.singles) == ("reduced", 16, "accuracy", 4)
    pair = plan_check(held, tok, slow, budget=5 * cost[False] * 0.6, **kw)  # 5 candidates do not fit, 2 do
    assert (pair.examples, pair.singles, pair.scales, pair.criterion) == (16, 0, [1.0], "accuracy")
    assert "the base against the composition on 16 examples" in pair.why
    fewer = plan_check(held, tok, slow, budget=1.5 * cost[False], **kw)
    assert (fewer.examples, fewer.scales) == (8, [1.0])
    assert plan_check(Dataset(held.samples, ""), tok, slow, budget=1e-3, **kw).mode == "skipped"


def test_eval_and_try_on_llamacpp(tmp_path, capsys, monkeypatch):
    """eval and try run a GGUF base (the default's shipped GGUF, or a copy named by path) with an adapter as a GGUF
    LoRA; text with markup is printed as it is."""
    from loramix.runtime import default_gguf

    entry = loramix.Bank("default").entry("numbers_french").adapter.path
    test = DEFAULT_SUITE / "numbers_french" / "test.jsonl"
    result = evaluate(test, adapter=entry, runtime="llama.cpp", limit=6)
    assert result["runtime"] == "llama.cpp" and result["n"] == 6 and result["rougeL"] > 0.3
    gguf = tmp_path / "smol.gguf"
    shutil.copy(default_gguf(), gguf)
    base_only = evaluate(test, base=str(gguf), limit=6)
    assert base_only["runtime"] == "llama.cpp" and base_only["rougeL"] < result["rougeL"]
    for args in (["eval", "--data", str(test), "--adapter", str(entry), "--runtime", "llama.cpp", "--limit", "6", "--json"],
                 ["try", "--adapter", str(entry), "--base", str(gguf), "-p", "[/INST] one [bold]", "--max-new-tokens", "4"]):
        code, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err


def test_a_gguf_base_from_the_hub_cache(tmp_path, monkeypatch, tiny_gguf):
    """owner/repo/file.gguf is fetched through huggingface_hub: offline, from a cache laid out as the hub lays it out."""
    from huggingface_hub import constants

    from loramix.runtime import resolve_base

    cache = tmp_path / "hub"
    cache_repo(cache, "model", "someone/tiny-GGUF", {"tiny.Q4_0.gguf": tiny_gguf.read_bytes()}, "a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolved = resolve_base("someone/tiny-GGUF/tiny.Q4_0.gguf")
    assert resolved.gguf.read_bytes() == tiny_gguf.read_bytes()
    result = evaluate(DEFAULT_SUITE / TASK / "test.jsonl", base="someone/tiny-GGUF/tiny.Q4_0.gguf", limit=2,
                              max_new_tokens=3)
    assert result["runtime"] == "llama.cpp" and result["n"] == 2
    with pytest.raises(LoramixError, match="cannot download the base model's GGUF"):
        resolve_base("someone/tiny-GGUF/other.gguf")


def test_bad_gguf_bases_are_one_line(tmp_path, capsys, monkeypatch, tiny_gguf, entry_gguf):
    """A LoRA GGUF, a truncated file, an unknown architecture, a file that is not GGUF, a base larger than the memory
    available, and a bank whose adapters do not fit the base: each one line naming the file, nothing written."""
    import synthetic_base as sb

    from loramix.runtime import memory

    test = str(DEFAULT_SUITE / TASK / "test.jsonl")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    text = tmp_path / "text.gguf"
    text.write_text("not a model")
    unknown = sb.write(tmp_path / "unknown.gguf", sb.TINY, architecture="notanarch")
    for path, why in [(entry_gguf, "is a GGUF adapter"), (truncated, "not a readable GGUF file"),
                      (text, "not a readable GGUF file"), (unknown, "cannot load")]:
        code, err = run_cli(["eval", "--data", test, "--base", str(path), "--limit", "1"], capsys, monkeypatch)
        assert code == 1 and err.count("\n") == 1 and why in err and str(path) in err, err
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    code, err = run_cli(["eval", "--data", test, "--base", str(tiny_gguf), "--limit", "1"], capsys, monkeypatch)
    assert code == 1 and "GB of memory" in err and err.count("\n") == 1, err
    code, err = run_cli(["eval", "--data", test, "--runtime", "torch", "--limit", "1"], capsys, monkeypatch)
    assert code == 1 and "on PyTorch" in err and "GGUF" in err and err.count("\n") == 1, err
    monkeypatch.undo()
    bank = make_bank(tmp_path / "bank", n=3)
    data = bank / "task_animals" / "train.jsonl"
    code, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(tmp_path / "o"), "--base",
                         str(tiny_gguf)], capsys, monkeypatch)
    assert code == 1 and "model.layers.0.self_attn" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    assert TINY_SHAPES  # the tiny bank's q_proj is [32, 32]; the tiny GGUF's hidden size is 64


def test_probe_answers_on_llamacpp_are_cached_apart(tmp_path):
    """Entries without data answer the probe prompts on llama.cpp when the runtime is llama.cpp (the default base's
    GGUF); those answers are cached under their own key, beside PyTorch's, and a rerun reads them."""
    from loramix.index import BankIndex
    from loramix.probes import ProbeSet
    from loramix.runtime.llamacpp import open_base

    bank = tmp_path / "bank"
    for name in ("numbers_french", "countries_alpha3", "morphology_plural"):
        shutil.copytree(loramix.Bank("default").entry(name).adapter.path, bank / name,
                        ignore=shutil.ignore_patterns("train.jsonl"))
    data = DEFAULT_SUITE / "numbers_spanish" / "train.jsonl"
    result = loramix.generate(bank, data, tmp_path / "out", runtime="llama.cpp", check=0)
    assert result.report.entry_signatures == "probes" and len(result.coefficients) == 3
    index = BankIndex(loramix.Bank(bank))
    folders = sorted(p.name for p in (index.dir / "probes").iterdir())
    with open_base(None) as engine:
        assert folders == [index._probes_key(ProbeSet(), engine, None, index.bank.base_model, "llama.cpp")]
        answers = index.probe_datasets(ProbeSet(), base=engine)  # cached: nothing answered again
        assert engine.tokens["generate"] == 0 and all(len(a) == len(ProbeSet().prompts) for a in answers)
    again = loramix.generate(bank, data, tmp_path / "again", runtime="llama.cpp", base="default", check=0)
    assert again.coefficients == result.coefficients


def test_a_lora_llamacpp_refuses_is_one_line(tmp_path, engine, tiny_gguf):
    """A LoRA file llama.cpp cannot apply to the base (damaged, or a base model instead of an adapter): one line."""
    from loramix.runtime.llamacpp import Lora

    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(64))
    for bad in (damaged, tiny_gguf):
        with pytest.raises(LoramixError, match="llama.cpp refuses this LoRA adapter") as e:
            engine.answers(["hi"], lora=Lora(bad), max_new_tokens=2, progress=False)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
    assert engine.answers(["hi"], max_new_tokens=2, progress=False)  # the engine still runs


def test_single_entries_are_converted_once_and_keyed_on_their_content(tmp_path):
    """The check's single entries are GGUF LoRAs kept in the bank index, converted once: a rerun reads them, and an
    entry whose weights change (same size, same modification time) gets a file of its own."""
    import os

    bank = tmp_path / "bank"
    for name in ("numbers_french", "numbers_german", "countries_alpha3"):
        shutil.copytree(loramix.Bank("default").entry(name).adapter.path, bank / name)
    data = DEFAULT_SUITE / "numbers_spanish" / "train.jsonl"
    kw = dict(runtime="llama.cpp", check=2, check_singles=2, check_criterion="loss")
    loramix.generate(bank, data, tmp_path / "a", **kw)
    cached = sorted((bank / ".loramix" / "gguf").iterdir())
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert len(cached) == 2 and all(p.name.endswith(".gguf") for p in cached)
    loramix.generate(bank, data, tmp_path / "b", **kw)
    assert sorted((bank / ".loramix" / "gguf").iterdir()) == cached and [p.stat().st_mtime_ns for p in cached] == stamps
    weights = bank / "numbers_french" / "adapter_model.safetensors"
    st = weights.stat()
    raw = bytearray(weights.read_bytes())
    raw[-8:] = bytes(8)  # the last float of a tensor zeroed: same size
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    from loramix.index import BankIndex
    from loramix.runtime.llamacpp import open_base

    with open_base(None) as engine:
        fresh = BankIndex(loramix.Bank(bank)).entry_gguf(loramix.Bank(bank).entry("numbers_french"), engine)
    assert fresh not in cached
