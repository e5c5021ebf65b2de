"""A careless or hostile user of the Python API, and a hostile adapter author: each case is read as PEFT applies it,
or refused in one LoramixError line naming what is wrong; never a silently wrong update, a cache reused wrongly, or
an exception of another kind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import make_bank, topic_records, write_jsonl

import loramix
from loramix.adapter import LoraAdapter
from loramix.errors import LoramixError
from loramix.train_config import TrainConfig

Q0 = "model.layers.0.self_attn.q_proj"
ATTN = {f"model.layers.{i}.self_attn.{p}": (32 if p == "q_proj" else 16, 32) for i in range(2) for p in ("q_proj", "v_proj")}


def _adapter(folder, config, shapes=ATTN, extra=None, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for m, (out_f, in_f) in shapes.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, in_f, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
    save_file({**tensors, **(extra or {})}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                                            "target_modules": ["q_proj", "v_proj"], **config}))
    return folder


def _one_line(fn, match):
    with pytest.raises(LoramixError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_alpha_pattern_order_is_not_lost_by_the_layout_cache(tmp_path):
    """Two adapters with equal weights files whose alpha_pattern keys differ only in order: PEFT takes the first key
    that matches, so the scales differ; a layout cached under the sorted config gave the second the first's."""
    first = {"q_proj": 2, Q0: 64}
    a1 = LoraAdapter(_adapter(tmp_path / "a1", {"alpha_pattern": first}))
    a2 = LoraAdapter(_adapter(tmp_path / "a2", {"alpha_pattern": dict(reversed(first.items()))}))
    assert a1.modules[Q0].scale == 2 / 4
    assert a2.modules[Q0].scale == 64 / 4


def test_lora_weights_of_an_embedding_are_left_out_as_peft_ignores_them(tmp_path, tiny_base):
    """PEFT's LoRA layer on an embedding has lora_embedding_A / _B: a lora_A.weight there is ignored (its update stays
    zero), so it is not read as a linear update."""
    extra = {"base_model.model.model.embed_tokens.lora_A.weight": torch.ones(4, 32),
             "base_model.model.model.embed_tokens.lora_B.weight": torch.ones(50, 4)}
    folder = _adapter(tmp_path / "ad", {"target_modules": ["q_proj", "v_proj", "embed_tokens"],
                                        "base_model_name_or_path": str(tiny_base)}, extra=extra)
    assert sorted(LoraAdapter(folder).modules) == sorted(ATTN)


def test_a_module_of_another_shape_than_the_base_is_refused(tmp_path, tiny_base):
    folder = _adapter(tmp_path / "ad", {"base_model_name_or_path": str(tiny_base)}, shapes={Q0: (32, 16)})
    _one_line(lambda: LoraAdapter(folder), r"ad: module 'model.layers.0.self_attn.q_proj' is \[32, 16\] \(\[out, in\]\) "
                                           r"but base model .* has \[32, 32\]")


def test_init_lora_weights_false_with_modules_without_tensors_is_refused(tmp_path, tiny_base):
    """init_lora_weights false: PEFT leaves the A and B of a targeted module without tensors random."""
    folder = _adapter(tmp_path / "ad", {"init_lora_weights": False, "base_model_name_or_path": str(tiny_base)},
                      shapes={Q0: (32, 32)})
    _one_line(lambda: LoraAdapter(folder), "field 'init_lora_weights' is false and module 'model.layers.0.self_attn.v_proj'")
    both = _adapter(tmp_path / "all", {"init_lora_weights": False, "base_model_name_or_path": str(tiny_base)})
    assert sorted(LoraAdapter(both).modules) == sorted(ATTN)
    null = _adapter(tmp_path / "null", {"init_lora_weights": None, "base_model_name_or_path": str(tiny_base)})
    assert sorted(LoraAdapter(null).modules) == sorted(ATTN)  # null: no initialisation, every module has tensors
    bare = _adapter(tmp_path / "bare", {"init_lora_weights": None, "base_model_name_or_path": str(tiny_base)},
                    shapes={Q0: (32, 32)})
    _one_line(lambda: LoraAdapter(bare), "field 'init_lora_weights' is null and module")


@pytest.mark.parametrize("field,value", [("lora_alpha", 10**400), ("alpha_pattern", {"q_proj": 10**400}),
                                         ("lora_dropout", 10**400)])
def test_an_integer_beyond_a_float_in_the_config_is_one_line(tmp_path, field, value):
    folder = _adapter(tmp_path / "ad", {field: value})
    _one_line(lambda: LoraAdapter(folder), f"ad: adapter_config.json: field '{field}' must be")


def _pickled_adapter(folder: Path) -> Path:
    """An adapter folder whose weights are only an adapter_model.bin (q_proj of layer 0, rank 4, all ones)."""
    folder.mkdir()
    torch.save({f"base_model.model.{Q0}.lora_A.weight": torch.ones(4, 32),
                f"base_model.model.{Q0}.lora_B.weight": torch.ones(32, 4)}, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
    return folder


def test_lora_adapter_checks_its_arguments(tmp_path):
    folder = _pickled_adapter(tmp_path / "pickled")
    _one_line(lambda: LoraAdapter(folder, allow_pickle="no"), "LoraAdapter\\(\\): allow_pickle must be bool, got str 'no'")
    _one_line(lambda: LoraAdapter(123), "LoraAdapter\\(\\): path must be")


@pytest.mark.parametrize("make", [
    lambda: loramix.GenerateConfig(temperature=10**400),
    lambda: loramix.GenerateConfig(scale=10**400),
    lambda: loramix.GenerateConfig(check_budget=10**400),
    lambda: TrainConfig(lr=10**400),
    lambda: TrainConfig(alpha=10**400),
    lambda: TrainConfig(budget=10**400),
    lambda: loramix.coefficients([1.0, 2.0], temperature=10**400),
    lambda: loramix.GenerateConfig(seed=-1),
    lambda: loramix.GenerateConfig(seed=2**64),
    lambda: TrainConfig(seed=-5),
    lambda: loramix.SignatureSpec(seed=-1),
])
def test_huge_and_negative_numbers_are_one_line(make):
    _one_line(make, "finite|must be|seed must be in")


def test_compose_coefficients_and_rank_of_odd_types(tmp_path):
    bank = loramix.Bank(make_bank(tmp_path / "bank", n=2))
    name = bank.entries[0].name
    _one_line(lambda: loramix.compose(bank, {name: 10**400}), f"the coefficient of '{name}' must be a finite number")
    as_float = loramix.compose(bank, {name: float(np.float32(0.3))}, rank=2)
    as_numpy = loramix.compose(bank, {name: np.float32(0.3)}, rank=np.int64(2))
    for m, (a, b) in as_float.factors.items():
        assert torch.equal(a, as_numpy.factors[m][0]) and torch.equal(b, as_numpy.factors[m][1])


def test_coefficients_take_inf_and_refuse_nan(tmp_path):
    c = loramix.coefficients([0.5, float("inf"), 1.0])  # +inf excludes an entry, as documented
    assert c[1] == 0 and abs(c.sum() - 1) < 1e-12
    assert np.array_equal(c, loramix.coefficients(np.array([0.5, np.inf, 1.0])))
    _one_line(lambda: loramix.coefficients(np.array([0.5, np.nan, 1.0])), "distances must be finite or \\+inf")
    _one_line(lambda: loramix.coefficients(np.array([0.5, -np.inf])), "distances must be finite or \\+inf")
    _one_line(lambda: loramix.coefficients(np.ones((2, 2))), "one row")
    _one_line(lambda: loramix.coefficients(np.array(["1", "2"])), "must hold numbers")
    _one_line(lambda: loramix.softmin(np.array([1.0, 2.0]), float("nan")), "temperature must be positive and finite")
    _one_line(lambda: loramix.softmin(np.array([1.0, 2.0]), "1"), "temperature must be positive and finite")


def test_signature_spec_and_signer_of_odd_types():
    assert loramix.SignatureSpec(seed=np.int64(3), max_samples=np.int64(4)).key() == loramix.SignatureSpec(seed=3, max_samples=4).key()
    _one_line(lambda: loramix.make_signer("unigram"), "make_signer\\(\\): spec must be SignatureSpec")


def test_a_dataset_built_by_hand_is_checked(tmp_path):
    from loramix import Dataset, Sample

    _one_line(lambda: Dataset(["x"], "s"), "Dataset: samples must be a list of Sample")
    _one_line(lambda: Dataset([("x", "y")], "s"), "Dataset: samples must be a list of Sample")
    _one_line(lambda: Dataset([Sample("a", ("b",))], None), "Dataset: source must be a string")
    assert Dataset((Sample("a", ("b",)),), "s").samples == [Sample("a", ("b",))]
    ds = loramix.read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4)))
    _one_line(lambda: ds.subsample(2, -1), "seed must be in")


def test_distances_refuse_signatures_they_cannot_compare():
    cloud = np.zeros((3, 4))
    _one_line(lambda: loramix.distance_row("w2", np.full((3, 4), np.nan), [cloud]), "finite numbers")
    _one_line(lambda: loramix.distance_row("gaussian-w2", cloud, [np.zeros((3, 5))]), "different dimensions")
    _one_line(lambda: loramix.distance_row("gaussian-w2", np.zeros((0, 4)), [cloud]), "2-D array")
    _one_line(lambda: loramix.distance_row("kl", np.zeros(0, dtype=np.int32), [np.ones(3, dtype=np.int32)]), "token ids")
    _one_line(lambda: loramix.distance_row("kl", np.array([-1, 2], dtype=np.int32), [np.ones(3, dtype=np.int32)]), "token ids")
    _one_line(lambda: loramix.distance_row("wd", "abc", ["abc"]), "must be a numpy array")
    _one_line(lambda: loramix.distance_matrix("mmd-rbf", [cloud, cloud], seed=-1), "seed must be in")
    assert loramix.distance_row("gaussian-w2", cloud, [cloud], seed=np.int64(0)).shape == (1,)


def test_save_adapter_refuses_what_peft_cannot_read(tmp_path):
    from loramix import save_adapter

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    ab = (torch.ones(4, 32), torch.ones(32, 4))
    _one_line(lambda: save_adapter(tmp_path / "a", {**config, "lora_alpha": float("nan")}, {Q0: ab}), "config is not JSON")
    _one_line(lambda: save_adapter(tmp_path / "b", config, {Q0: (torch.ones(4, 32), torch.ones(32, 3))}), "are not \\[r, in\\]")
    _one_line(lambda: save_adapter(tmp_path / "c", config, {Q0: (np.ones((4, 32)), np.ones((32, 4)))}), "factors must be")
    _one_line(lambda: save_adapter(tmp_path / "d", config, {Q0: (torch.ones(4, 32, dtype=torch.int64), ab[1])}), "must be float")
    shared = torch.ones(4, 4)
    save_adapter(tmp_path / "e", config, {Q0: (shared, shared)})  # tensors sharing memory: written apart
    (tmp_path / "f").write_text("x")
    _one_line(lambda: save_adapter(tmp_path / "f", config, {Q0: ab}), "f: File exists")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_damaged_save_to_disk_state_is_one_line(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"input": "a", "output": "b"}]).save_to_disk(str(tmp_path / "ds"))
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    (tmp_path / "ds" / "state.json").write_text(json.dumps({**state, "_split": 5}))
    _one_line(lambda: loramix.read_dataset(tmp_path / "ds"), "ds: not a readable save_to_disk folder")


def test_gram_matrix_names_an_entry_with_nan_weights(tmp_path):
    from safetensors.torch import load_file

    root = make_bank(tmp_path / "bank", n=2)
    weights = sorted(root.iterdir())[0] / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, weights)
    bank = loramix.Bank(root)
    _one_line(lambda: loramix.gram_matrix(bank, bank.entries), "has NaN or Inf weights")
    _one_line(lambda: loramix.gram_matrix(bank, bank.entries, 5), "gram_matrix\\(\\): space must be str")


@pytest.mark.parametrize("kw,want", [
    ({"model": ""}, "model must name a model or file, got an empty string"),
    ({"probes": " "}, "probes must name a model or file"),
    ({"base": ""}, "base must name a model or file"),
])
def test_an_empty_string_is_not_the_current_folder(kw, want):
    _one_line(lambda: loramix.GenerateConfig(**kw), want)


def test_generate_refuses_empty_paths(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4))
    bank = make_bank(tmp_path / "bank", n=2)
    for args, name in [((bank, data, ""), "out"), ((bank, "", tmp_path / "o"), "data"), (("", data, tmp_path / "o"), "bank")]:
        _one_line(lambda: loramix.generate(*args, check=0), f"generate\\(\\): {name} is an empty path")
    assert not (tmp_path / "o").exists()


def test_keep_top_k_refuses_a_k_that_is_no_whole_number():
    from loramix.operators import keep_top_k

    for k in ("2", 1.5, True):
        _one_line(lambda: keep_top_k(np.array([0.5, 0.5]), k), "top-k must be a whole number")
    assert keep_top_k(np.array([0.2, 0.3, 0.5]), np.int64(1)).tolist() == [0.0, 0.0, 1.0]


def test_factors_of_a_pickled_adapter_are_copies(tmp_path):
    folder = _pickled_adapter(tmp_path / "pickled")
    adapter = LoraAdapter(folder, allow_pickle=True)
    a, _ = adapter.factors(Q0)
    a.mul_(0)
    assert bool((adapter.factors(Q0)[0] == 1).all())


def test_neural_fit_and_from_bytes_refuse_what_they_cannot_use():
    from loramix import Neural

    d = np.array([[0, 1, 2], [1, 0, 1.5], [2, 1.5, 0]], float)
    g = np.eye(3)
    _one_line(lambda: Neural().fit(np.where(d == 1, np.nan, d), g, epochs=1), "distances must be finite or \\+inf")
    _one_line(lambda: Neural().fit(d, np.full((3, 3), np.nan), epochs=1), "gram finite")
    _one_line(lambda: Neural().fit(d, np.eye(2), epochs=1), "square and of one size")
    _one_line(lambda: Neural().fit(d, g, epochs="2"), "epochs must be")
    _one_line(lambda: Neural().fit(d, g, epochs=1, lr=float("nan")), "lr must be")
    _one_line(lambda: Neural.from_bytes(b"garbage"), "not a fitted operator's bytes")
    fitted = Neural().fit(d, g, epochs=1)
    assert np.array_equal(Neural.from_bytes(fitted.to_bytes()).scores(np.array([1.0, 2.0])), fitted.scores(np.array([1.0, 2.0])))


def _in_thread(fn):
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_an_adapter_opened_off_the_main_thread_reads_alike_and_quickly(tmp_path, tiny_base):
    """Off the main thread a bounded match runs in a child Python; every pattern of a config is matched against
    every module in one child, not one child per match (which took seconds per adapter, minutes on a large base)."""
    import time

    import loramix.adapter.patterns as pc

    config = {"target_modules": r".*\.(q|v)_proj", "exclude_modules": r".*\.1\.self_attn\.v_proj",
              "rank_pattern": {f"zz{i}": 4 for i in range(8)}, "alpha_pattern": {"q_proj": 2, Q0: 64, r"layers\.1\..*": 3},
              "base_model_name_or_path": str(tiny_base)}
    folder = _adapter(tmp_path / "ad", config)
    pc._PREMATCHED.clear()
    start = time.monotonic()
    threaded = _in_thread(lambda: {m: (x.rank, x.scale) for m, x in LoraAdapter(folder).modules.items()})
    assert time.monotonic() - start < 15
    assert threaded == {m: (x.rank, x.scale) for m, x in LoraAdapter(folder).modules.items()}
    assert threaded[Q0] == (4, 0.5) and threaded["model.layers.1.self_attn.q_proj"] == (4, 0.5)  # the first key wins
    assert "model.layers.1.self_attn.v_proj" not in threaded and threaded["model.layers.0.self_attn.v_proj"] == (4, 2.0)
    slow = _adapter(tmp_path / "slow", {"target_modules": "(.*.*.*)*X", "base_model_name_or_path": str(tiny_base)})
    with pytest.raises(LoramixError, match="catastrophic backtracking"):
        _in_thread(lambda: LoraAdapter(slow))


def test_bank_index_and_read_report_check_their_arguments():
    """BankIndex, its signatures and mode, and read_report refuse arguments of another type or value in one line."""
    import loramix
    from loramix import BankIndex, read_report

    index = BankIndex(loramix.Bank("default"))
    for call, needle in [(lambda: BankIndex("path"), "bank must be Bank"), (lambda: index.signatures("embed"), "spec must be"),
                         (lambda: index.mode("DATA"), "got 'DATA'"), (lambda: read_report(None), "adapter_dir must be")]:
        with pytest.raises(LoramixError, match=needle):
            call()


# -- a third hostile pass over the Python API ----------------------------------------------------------------------

def _peft_and_merged(tmp_path, base_model, module: str, out_f: int, in_f: int, **config):
    """(PEFT's logits, merged_adapter's logits, the base's logits after the block) for a rank-4 adapter on `module`."""
    import copy
    import warnings

    from peft import PeftModel

    from loramix.evaluate import merged_adapter

    base_model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(4, in_f, generator=g) * 0.3,
               f"base_model.model.{module}.lora_B.weight": torch.randn(out_f, 4, generator=g) * 0.3},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": [module.rsplit(".", 1)[-1]], "base_model_name_or_path": str(tmp_path / "base"), **config}))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = base_model(ids).logits
        peft = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder))(ids).logits
        with merged_adapter(base_model, folder) as merged:
            got = merged(ids).logits
        after = base_model(ids).logits
    assert torch.equal(before, after)  # the base is itself again after the block
    return peft, got, before


def test_merged_adapter_on_tied_embeddings_changes_only_the_output_layer(tmp_path):
    """merged_adapter added an lm_head update into the weight lm_head shares with the input embeddings (SmolLM2's
    tie): logits off PEFT's by up to 2 where PEFT's largest was 0.9."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    peft, got, before = _peft_and_merged(tmp_path, model, "lm_head", 64, 32)
    assert (peft - before).abs().max() > 0.1
    torch.testing.assert_close(got, peft, atol=1e-5, rtol=1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again


@pytest.mark.parametrize("module,out_f", [("transformer.h.0.attn.c_proj", 32), ("transformer.h.0.attn.c_attn", 96)])
def test_merged_adapter_on_conv1d_modules_is_what_peft_applies(tmp_path, module, out_f):
    """GPT-2's Conv1D holds its weight as [in, out]: the update was added untransposed (wrong on a square module,
    a raw RuntimeError on c_attn)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    peft, got, before = _peft_and_merged(tmp_path, model, module, out_f, 32, fan_in_fan_out=True)
    assert (peft - before).abs().max() > 0.05
    torch.testing.assert_close(got, peft, atol=1e-5, rtol=1e-5)


def test_a_composition_is_never_written_into_the_bank_it_reads(tmp_path):
    """write_composition into a bank entry's folder truncated that entry's weights to zeros before failing."""
    from loramix.compose import write_composition

    root = make_bank(tmp_path / "bank", n=2)
    weights = root / "task_animals" / "adapter_model.safetensors"
    before = weights.read_bytes()
    bank = loramix.Bank(root)
    for folder in (root / "task_animals", root / "new", root):
        _one_line(lambda: write_composition(folder, bank, {"task_animals": 0.5, "task_colors": 0.5}), "lies inside bank")
    assert weights.read_bytes() == before and not (root / "new").exists()


def test_safetensors_headers_are_read_as_safetensors_reads_them(tmp_path):
    """A header opening with a UTF-8 byte-order mark (safetensors refuses it) was read; `"__metadata__": null`
    (safetensors reads it as no metadata) was refused."""
    import struct

    from safetensors.torch import load_file

    k = f"base_model.model.{Q0}.lora_"
    data = torch.randn(4, 32).numpy().tobytes() + torch.randn(32, 4).numpy().tobytes()
    spans = {k + "A.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]},
             k + "B.weight": {"dtype": "F32", "shape": [32, 4], "data_offsets": [512, 1024]}}
    for name, head in (("bom", b"\xef\xbb\xbf" + json.dumps(spans).encode()),
                       ("null", json.dumps({"__metadata__": None, **spans}).encode())):
        folder = tmp_path / name
        folder.mkdir()
        head += b" " * (-len(head) % 8)
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                "target_modules": ["q_proj"]}))
    _one_line(lambda: LoraAdapter(tmp_path / "bom"), "Unexpected UTF-8 BOM")
    assert set(LoraAdapter(tmp_path / "null").modules) == {Q0}
    assert len(load_file(tmp_path / "null" / "adapter_model.safetensors")) == 2


def test_scores_and_predictions_take_one_answer_per_record(tmp_path):
    """score('bd', two records) scored each character as a prediction (a perfect score); one prediction for two
    records scored one; write_predictions wrote one line for two records, or over the data file itself."""
    from loramix.data import Dataset, Sample, read_dataset
    from loramix.evaluate import write_predictions
    from loramix.runtime.scores import score

    data = write_jsonl(tmp_path / "test.jsonl", [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}])
    ds = read_dataset(data)
    _one_line(lambda: score("bd", ds), "a list of strings")
    _one_line(lambda: score(["b"], ds), "1 prediction")
    _one_line(lambda: score([], Dataset([Sample("a", ("b",))], "x").samples[:0]), "at least one")
    assert score(["b", "x"], ds)["rougeL"] == 0.5
    original = data.read_bytes()
    _one_line(lambda: write_predictions(data, ds, ["b"]), "1 prediction")
    _one_line(lambda: write_predictions(data, ds, ["b", "d"]), "is the data")
    assert data.read_bytes() == original
    write_predictions(tmp_path / "p.jsonl", ds, ["b", "d"])
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("call,match", [
    (lambda ds: ds.subsample(-1, 0), "max_samples must be at least 0"),
    (lambda ds: ds.subsample(1.5, 0), "max_samples must be int"),
    (lambda ds: ds.subsample(True, 0), "max_samples must be int"),
    (lambda ds: ds.subsample(1, "x"), "seed must be int"),
    (lambda ds: ds.subsample(5, -1), "seed must be in"),
    (lambda ds: __import__("loramix.probes").probes.ProbeSet(max_samples=-3), "max_samples must be at least 1"),
    (lambda ds: __import__("loramix.probes").probes.ProbeSet(max_samples="4"), "max_samples must be int"),
    (lambda ds: __import__("loramix.distances").distances.aligned(np.ones(2), np.ones(1)), "two rows of one length"),
    (lambda ds: __import__("loramix.check").check.check_candidates({"a": 1.0}, singles="x"), "singles must be int"),
    (lambda ds: __import__("loramix.check").check.check_candidates({"a": 1.0}, scales=(-1,)), "must be positive"),
    (lambda ds: loramix.distance_row("kl", np.array([2**63], dtype=np.uint64), [np.array([1, 2])]), "exceeds"),
    (lambda ds: loramix.distance_row("kl", np.array([10**12]), [np.array([1, 2])]), "exceeds"),
    (lambda ds: __import__("loramix.runtime.scores").runtime.scores.normalize(None), "text must be str"),
    (lambda ds: TrainConfig(device="tpu"), "must be a torch device"),
    (lambda ds: TrainConfig(device="meta"), "no such device"),
    (lambda ds: TrainConfig(device="cuda:99"), "no such device"),
])
def test_public_helpers_refuse_bad_arguments_in_one_line(call, match):
    """Each raised a raw exception (IndexError, OverflowError, a 7 TiB MemoryError, AssertionError in train ...) or
    made a negated check candidate."""
    from loramix.data import Dataset, Sample

    _one_line(lambda: call(Dataset([Sample("a", ("b",)), Sample("c", ("d",))], "x")), match)


def test_evaluate_refuses_no_records_and_a_model_without_its_tokenizer(tmp_path):
    from loramix.data import Dataset
    from loramix.evaluate import evaluate

    _one_line(lambda: evaluate(Dataset([], "empty")), "no records to evaluate")
    _one_line(lambda: evaluate(Dataset([], "empty"), model=object()), "model and tokenizer together")


# -- a fourth hostile pass ------------------------------------------------------------------------------------------

def test_export_gguf_refuses_a_lora_on_a_tied_output_layer(tmp_path):
    """On a base that ties its output layer to its input embeddings (SmolLM2, the default), a GGUF has no output
    weight: `export gguf` wrote output.weight.lora_a/b anyway (exit 0) and llama.cpp refused the file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramix.export import export_gguf

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"base_model.model.lm_head.lora_A.weight": torch.randn(4, 32),
               "base_model.model.lm_head.lora_B.weight": torch.randn(64, 4)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": ["lm_head"], "base_model_name_or_path": str(tmp_path / "base")}))
    _one_line(lambda: export_gguf(folder, tmp_path / "a.gguf"), "'lm_head' is the output layer, which base model .* ties")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("call,match", [
    (lambda b, ds: __import__("loramix.calibrate").calibrate.calibrate(b, examples=0), "examples must be at least 1"),
    (lambda b, ds: __import__("loramix.calibrate").calibrate.calibrate(b, examples="2"), "examples must be int"),
    (lambda b, ds: __import__("loramix.check").check.check(b, {"task_animals": 1.0}, ds, examples=0), "at least 1"),
    (lambda b, ds: __import__("loramix.hub").hub.pull_base("/nonexistent/x", None), "base must be str"),
    (lambda b, ds: __import__("loramix.hub").hub.pull_base("/nonexistent/x", "o/m", limit=0), "limit must be at least 1"),
    (lambda b, ds: __import__("loramix.hub").hub.base_model_adapters("o/m", filters="good"), "filters must be"),
    (lambda b, ds: __import__("loramix.tasks.build").tasks.build.build_suite(5), "out must be str or Path"),
    (lambda b, ds: __import__("loramix.build").build.build_bank("default", "/nonexistent/x", tasks="numbers_roman"),
     "tasks must be"),
])
def test_more_public_functions_refuse_bad_arguments(tmp_path, call, match):
    """calibrate() and check() with examples=0 raised min() of an empty sequence; build_bank(tasks='numbers_roman')
    read the string as one-letter tasks; base_model_adapters(filters='good') as the letters g, o, o, d."""
    from loramix.data import read_dataset

    bank = loramix.Bank(make_bank(tmp_path / "bank", n=2))
    _one_line(lambda: call(bank, read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 4)))), match)


def test_probes_unused_or_not_utf8_are_said(tmp_path, caplog):
    """`generate --probes FILE` on a bank whose entries all have data ignored FILE silently (even a missing one)."""
    from loramix.config import GenerateConfig

    _one_line(lambda: GenerateConfig(probes="p\udcfe"), "probes p\\\\udcfe: is not UTF-8 text|probes p.*not UTF-8 text")
    bank = make_bank(tmp_path / "bank", n=3)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 8))
    loramix.generate(bank, data, tmp_path / "o", check=0, probes=str(tmp_path / "missing.jsonl"), signature="embed")
    assert any("is not used: every entry is signed by its training data" in r.getMessage() for r in caplog.records)
