"""Readers that would be silently wrong, hang or end in a traceback: adapter configs PEFT reads one way and loramix
another, user regular expressions, JSON beyond the parser, CSV and JSONL records that do not round-trip."""

import csv
import json
import time

import pytest
import torch
from helpers import make_bank, topic_records, write_adapter, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_generate import peft_deltas

from loramix import Bank, LoraAdapter, read_dataset
from loramix.data import Sample
from loramix.data import write_jsonl as write_samples
from loramix.errors import LoramixError
from loramix.files import parse_json


def _config(folder, **change):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("also", [True, False])
def test_tensors_without_the_peft_prefix_are_refused(tmp_path, also):
    """PEFT loads only 'base_model.model.<module>.lora_A.weight': an unprefixed key (alone, or beside the prefixed
    one with other values) gives that module a zero update under PEFT, so composing it would be wrong."""
    folder = write_adapter(tmp_path / "ad")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key.removeprefix("base_model.model.")] = tensors[key] * 41
    if not also:
        del tensors[key]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(LoramixError, match=r"tensor 'model.layers.0.self_attn.q_proj.lora_A.weight' lacks the "
                                           r"'base_model.model.' prefix, so PEFT does not load it"):
        LoraAdapter(folder)


@pytest.mark.parametrize("change", [
    {"target_modules": ["q_proj"]},
    {"target_modules": r"model\.layers\.1\.self_attn\.[qkv]_proj"},
    {"exclude_modules": ["k_proj"]},
    {"layers_to_transform": [1]},
    {"layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["model.layers.1.self_attn.q_proj", "k_proj"], "layers_to_transform": [0]},  # a full name: any layer
])
def test_only_the_modules_peft_applies_are_composed(tmp_path, tiny_base, change, caplog):
    """The file holds q/k/v tensors of both layers; the config selects fewer: loramix reads what PEFT applies."""
    folder = write_adapter(tmp_path / "ad")
    _config(folder, **change)
    adapter = LoraAdapter(folder)
    applied = peft_deltas(tiny_base, folder)
    assert sorted(adapter.modules) == sorted(applied) and 0 < len(applied) < 6
    assert "not selected by" in caplog.text
    for m, delta in applied.items():
        torch.testing.assert_close(adapter.delta(m), delta)


def test_a_bank_composes_only_the_selected_modules(tmp_path):
    root = make_bank(tmp_path / "bank", n=2)
    for entry in root.iterdir():
        _config(entry, target_modules=["q_proj"])
    assert {m.rsplit(".", 1)[-1] for m in Bank(root).shapes} == {"q_proj"}


SLOW = "(.*){1,32000}[bc]"  # backtracks for minutes on a module name without b or c (even with `regex`)


@pytest.mark.parametrize("change,pattern", [
    ({"rank_pattern": {SLOW: 4}}, r"field 'rank_pattern': the regular expression .* takes more than 0.5 s"),
    ({"target_modules": SLOW}, r"field 'target_modules': the regular expression .* takes more than 0.5 s"),
    ({"alpha_pattern": {"[": 4}}, r"field 'alpha_pattern': .* is not a valid regular expression"),
    ({"layers_pattern": "(("}, r"field 'layers_pattern': .* is not a valid regular expression"),
])
def test_user_regular_expressions_are_bounded(tmp_path, change, pattern):
    folder = write_adapter(tmp_path / "ad")
    _config(folder, **change)
    start = time.perf_counter()
    with pytest.raises(LoramixError, match=pattern):
        LoraAdapter(folder)
    assert time.perf_counter() - start < 5


def test_configs_peft_refuses_are_refused(tmp_path):
    folder = write_adapter(tmp_path / "ad")
    _config(folder, target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(LoramixError, match="'layers_to_transform' is set but 'target_modules' is a regular expression"):
        LoraAdapter(folder)
    _config(folder, target_modules=["q_proj"], layers_to_transform=None, layers_pattern="layers")
    with pytest.raises(LoramixError, match="'layers_pattern' is set without 'layers_to_transform'"):
        LoraAdapter(folder)


def test_the_layer_index_is_the_first_number_as_in_peft():
    from loramix.adapter import applied_by_peft

    config = {"target_modules": ["w1"], "layers_to_transform": [1]}
    assert applied_by_peft(config, "model.layers.1.experts.0.w1", "x")  # layer 1, expert 0
    assert not applied_by_peft(config, "model.layers.0.experts.1.w1", "x")
    assert applied_by_peft({**config, "layers_pattern": "layers"}, "layers.1.experts.0.w1", "x")  # at the start


@pytest.mark.parametrize("field,value,want", [
    ("r", "8", "a positive integer"), ("r", 2.5, "a positive integer"), ("r", 8.0, "a positive integer"), ("lora_alpha", float("nan"), "finite"),
    ("lora_alpha", float("inf"), "finite"), ("use_rslora", "yes", "true or false"),
    ("base_model_name_or_path", True, "a string"), ("target_modules", 3, "a string or a list"),
    ("rank_pattern", {"q_proj": "4"}, "positive integers"), ("layers_to_transform", "0", "layer index"),
    ("fan_in_fan_out", 1, "true or false"), ("lora_dropout", -1, "in \\[0, 1\\]"),
])
def test_config_fields_are_type_checked(tmp_path, field, value, want):
    folder = write_adapter(tmp_path / "ad")
    (folder / "adapter_config.json").write_text(
        json.dumps({**json.loads((folder / "adapter_config.json").read_text()), field: value}), encoding="utf-8")
    with pytest.raises(LoramixError, match=f"ad: adapter_config.json: field '{field}' must be .*{want}"):
        LoraAdapter(folder)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"r": ' + "9" * 5000 + "}", b"\xff\xfe{}"])
def test_json_the_parser_cannot_take_is_one_line(tmp_path, text):
    with pytest.raises(LoramixError, match="^x.json: invalid JSON") as e:
        parse_json(text, "x.json")
    assert "\n" not in str(e.value)
    folder = write_adapter(tmp_path / "ad")
    (folder / "adapter_config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(LoramixError, match="adapter_config.json: invalid JSON"):
        LoraAdapter(folder)


def test_csv_fields_keep_their_newlines_and_may_be_long(tmp_path):
    path = tmp_path / "d.csv"
    rows = [{"input": "Translate:\nfirst line\r\nsecond", "output": "a,b\n\"c\""}, {"input": "x" * 200_000, "output": "y"}]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["input", "output"])
        w.writeheader()
        w.writerows(rows)
    assert [(s.input, s.output) for s in read_dataset(path)] == [(r["input"], r["output"]) for r in rows]


def test_csv_errors_are_one_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('input,output\n"x' + "y" * 1_100_000 + '",z\n', encoding="utf-8")
    with pytest.raises(LoramixError, match=r"d.csv:\d+: (not valid CSV|the record is)"):
        read_dataset(path)


def test_a_lone_surrogate_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a\ud800b", "output": "c"}])
    with pytest.raises(LoramixError, match=r"d.jsonl:1: the text holds a lone surrogate \(U\+D800\)"):
        read_dataset(path)


@settings(max_examples=60, deadline=None)
@given(samples=st.lists(st.builds(Sample, st.text(st.characters(blacklist_categories=["Cs"])),
                                  st.lists(st.text(st.characters(blacklist_categories=["Cs"])), min_size=1, max_size=3).map(tuple)),
                        min_size=1, max_size=5))
def test_what_loramix_writes_as_jsonl_it_reads_back(tmp_path_factory, samples):
    """U+2028, U+0085, \\r and the like are kept in strings: records end at \\n only."""
    path = tmp_path_factory.mktemp("rt") / "train.jsonl"
    write_samples(samples, path)
    assert read_dataset(path).samples == samples


def test_u2028_round_trips_through_bank_add(tmp_path):
    from loramix.hub import add_adapter

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"input": "line\u2028break\u0085", "output": "x\u2029y"}] * 3, ensure_ascii=False), encoding="utf-8")
    entry = add_adapter(tmp_path / "bank", str(write_adapter(tmp_path / "ad")), data)
    assert read_dataset(entry / "train.jsonl").samples[0].input == "line\u2028break\u0085"


def test_bank_add_leaves_no_empty_bank_folder(tmp_path):
    from loramix.hub import add_adapter

    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 3))
    bad = write_adapter(tmp_path / "ad")
    _config(bad, r="x")
    with pytest.raises(LoramixError):
        add_adapter(tmp_path / "bank", str(bad), data)
    assert not (tmp_path / "bank").exists()


def test_an_adapter_that_does_not_fit_the_base_is_one_line(tmp_path, tiny_base):
    from loramix.evaluate import load_for_eval
    from loramix.export import export_merged

    folder = write_adapter(tmp_path / "ad", shapes={"model.layers.0.self_attn.q_proj": (8, 8)})
    with pytest.raises(LoramixError, match=r"ad: PEFT cannot load this adapter on base model .*size mismatch") as e:
        load_for_eval(str(tiny_base), folder)
    assert "\n" not in str(e.value)
    with pytest.raises(LoramixError, match="PEFT cannot load this adapter"):
        export_merged(folder, tmp_path / "merged", base=str(tiny_base))
    assert not (tmp_path / "merged").exists()


def test_an_index_made_with_another_key_is_not_believed(tmp_path, monkeypatch):
    """A bank downloaded with its own .loramix/ (whose maker forged a signature, with checksums that agree): the
    forged file fails this user's HMAC, is deleted and recomputed."""
    import numpy as np

    from loramix.index import BankIndex, _npy
    from loramix.store import store
    from loramix.signatures import SignatureSpec

    root = make_bank(tmp_path / "bank", n=3)
    spec = SignatureSpec("embed", max_samples=4)
    first = BankIndex(Bank(root)).signatures(spec)
    index = BankIndex(Bank(root))
    stem = index._signature_stem(index.resolve(spec), index.bank.usable[0])
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "stranger"))  # another key
    store(index.dir, stem, _npy(np.zeros_like(first[0])), "npy")
    monkeypatch.undo()
    assert len(list(stem.parent.glob(f"{stem.name}.*.npy"))) == 1  # the forged one replaced ours
    again = BankIndex(Bank(root)).signatures(spec)
    assert all((a == b).all() for a, b in zip(first, again))


def test_the_index_is_never_written_through_a_link(tmp_path):
    from loramix.index import BankIndex
    from loramix.signatures import SignatureSpec

    root = make_bank(tmp_path / "bank", n=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / ".loramix").mkdir()
    (root / ".loramix" / "signatures").symlink_to(outside)
    with pytest.raises(LoramixError, match="leads outside the bank index"):
        BankIndex(Bank(root)).signatures(SignatureSpec("embed", max_samples=4))
    assert not any(outside.rglob("*"))
    (root / ".loramix" / "signatures").unlink()
    (root / ".loramix").rmdir()
    (root / ".loramix").symlink_to(outside)
    with pytest.raises(LoramixError, match="is a link or not a folder"):
        BankIndex(Bank(root))


def test_gguf_export_refuses_an_adapter_that_does_not_fit_the_base(tmp_path, tiny_base):
    from loramix.export import export_gguf

    folder = write_adapter(tmp_path / "ad", shapes={"model.layers.0.self_attn.q_proj": (8, 8)})
    with pytest.raises(LoramixError, match=r"ad: module 'model.layers.0.self_attn.q_proj' is \[8, 8\] \(\[out, in\]\) but base"):
        export_gguf(folder, tmp_path / "a.gguf", base=str(tiny_base))
    folder = write_adapter(tmp_path / "ad2", shapes={"model.layers.9.self_attn.q_proj": (32, 32)})
    with pytest.raises(LoramixError, match=r"module 'model.layers.9.self_attn.q_proj' is not in base model"):
        export_gguf(folder, tmp_path / "a.gguf", base=str(tiny_base))
    assert not list(tmp_path.glob("*.gguf"))


def test_hub_ids_and_a_missing_cache_are_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from loramix.hub import add_adapter, pull_lots_of_loras

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "no-cache-here"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoramixError, match="no Lots-of-LoRAs dataset found"):
        pull_lots_of_loras(tmp_path / "bank")
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 3))
    for bad in ("a/b/c", "bad id!!", "-x-"):
        with pytest.raises(LoramixError, match="cannot download"):
            add_adapter(tmp_path / "bank", bad, data, name="x")
    assert not (tmp_path / "bank").exists()


def test_a_fifo_as_data_is_refused_not_waited_on(tmp_path):
    import os

    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(LoramixError, match="d.jsonl: not a regular file or a folder"):
        read_dataset(fifo)


def test_the_composed_config_selects_every_composed_module(tmp_path, tiny_base):
    """Entries with layers_to_transform [0], one naming a layer-1 module in full (PEFT applies it in any layer): the
    output holds that module, and its config must make PEFT apply it too."""
    from loramix.compose import write_composition

    root = make_bank(tmp_path / "bank", n=2, base=str(tiny_base))
    _config(root / "task_animals", layers_to_transform=[0])
    _config(root / "task_colors", layers_to_transform=[0],
            target_modules=["model.layers.1.self_attn.q_proj", "k_proj", "v_proj"])
    bank = Bank(root)
    (tmp_path / "out").mkdir()
    write_composition(tmp_path / "out", bank, {"task_animals": 0.5, "task_colors": 0.5}, rank="full")
    applied = peft_deltas(tiny_base, tmp_path / "out")
    assert sorted(applied) == sorted(bank.shapes) and "model.layers.1.self_attn.q_proj" in applied
    for m, delta in applied.items():
        want = sum(0.5 * e.adapter.delta(m) for e in bank.entries if m in e.adapter.modules)
        torch.testing.assert_close(delta, want)


@pytest.mark.parametrize("text,want", [
    ("input,output\na,b,c\n", r"d.csv:2: the row has more fields than the header's 2 \(an unquoted delimiter"),
    ("input,output,x\na,b\n", r"d.csv:2: the row has fewer fields than the header's 3"),
    ("input,output,input\na,b,c\n", r"d.csv:1: the header names a column twice \(input\)"),
])
def test_csv_rows_that_do_not_fit_the_header_are_refused(tmp_path, text, want):
    (tmp_path / "d.csv").write_text(text, encoding="utf-8")
    with pytest.raises(LoramixError, match=want):
        read_dataset(tmp_path / "d.csv")


def test_empty_texts_run_on_a_base_without_template_or_bos(tmp_path, tiny_base):
    """The tiny base's tokenizer adds nothing to an empty text: the prompt is then its bos/eos token alone."""
    from loramix.evaluate import evaluate
    from loramix.runtime.pytorch import load_tokenizer
    from loramix.prompts import prompt_ids
    from loramix.train import train
    from loramix.train_config import TrainConfig

    tok = load_tokenizer(str(tiny_base))
    assert not getattr(tok, "chat_template", None) and tok("")["input_ids"] == []
    assert len(prompt_ids(tok, "")) == 1
    data = write_jsonl(tmp_path / "e.jsonl", [{"input": "", "output": ""}, {"input": "  ", "output": "\t"}])
    train(data, tmp_path / "t", TrainConfig(steps=1, batch_size=2), base=str(tiny_base))
    assert evaluate(read_dataset(data), base=str(tiny_base), adapter=tmp_path / "t", max_new_tokens=2)["n"] == 2


def test_gguf_f16_keeps_unbalanced_factors_and_refuses_what_it_cannot_hold(tmp_path, tiny_base):
    """B x 1e5 and A x 1e-6 (the same update): rebalanced before the cast, the f16 file holds it; an update beyond
    float16's range is refused, not written as inf."""
    import numpy as np
    from gguf import GGUFReader

    from loramix.export import export_gguf

    folder = write_adapter(tmp_path / "ad")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * (1e5 if ".lora_B." in k else 1e-6) for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    out = export_gguf(folder, tmp_path / "a.gguf", base=str(tiny_base), dtype="f16")
    got = {t.name: np.asarray(t.data).astype(np.float64) for t in GGUFReader(out).tensors}
    a, b = got["blk.0.attn_v.weight.lora_a"], got["blk.0.attn_v.weight.lora_b"]
    want = LoraAdapter(folder).delta("model.layers.0.self_attn.v_proj").numpy()
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert np.linalg.norm(8 / 4 * (b @ a) - want) / np.linalg.norm(want) < 2e-3
    save_file({k: v * 1e4 for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    with pytest.raises(LoramixError, match=r"update reaches .* beyond torch.float16's range .* choose another dtype"):
        export_gguf(folder, tmp_path / "b.gguf", base=str(tiny_base), dtype="f16")
    assert not (tmp_path / "b.gguf").exists()


def test_prompts_longer_than_the_context_are_cut_for_generation(tiny_base):
    """The tiny base has 128 positions: a 50,000-word prompt is cut from the left, as training cuts it."""
    from loramix.runtime.pytorch import generate_answers
    from loramix.runtime.pytorch import load_model, load_tokenizer
    from loramix.prompts import prompt_room

    model, tok = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    assert prompt_room(model, 8) == model.config.max_position_embeddings - 8
    start = time.perf_counter()
    answers = generate_answers(model, tok, ["cat " * 50_000, "dog"], max_new_tokens=8, progress=False)
    assert len(answers) == 2 and time.perf_counter() - start < 30


def test_train_from_an_init_records_its_shape_and_refuses_a_dead_one(tmp_path, tiny_base):
    from loramix.train import train
    from loramix.train_config import TrainConfig

    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4))
    init = write_adapter(tmp_path / "init", rank=2, alpha=3, use_rslora=True, base=str(tiny_base))
    record = train(data, tmp_path / "t", TrainConfig(steps=1, batch_size=2), base=str(tiny_base), init=init)
    assert record["lora"]["r"] == 2 and record["lora"]["lora_alpha"] == 3 and record["lora"]["use_rslora"]
    save_file({k: torch.zeros_like(v) for k, v in load_file(init / "adapter_model.safetensors").items()},
              init / "adapter_model.safetensors")
    with pytest.raises(LoramixError, match="its update is zero in every module"):
        train(data, tmp_path / "t2", TrainConfig(steps=1, batch_size=2), base=str(tiny_base), init=init)
    assert not (tmp_path / "t2").exists()


@pytest.mark.parametrize("x", [float("nan"), float("inf"), "1", True, None])
def test_compose_refuses_coefficients_that_are_not_finite_numbers(tmp_path, x):
    from loramix import compose

    bank = Bank(make_bank(tmp_path / "bank", n=2))
    with pytest.raises(LoramixError, match="the coefficient of 'task_animals' must be a finite number"):
        compose(bank, {"task_animals": x, "task_colors": 0.5})


def test_generate_refuses_an_empty_dataset_object(tmp_path):
    from loramix import Dataset, generate

    with pytest.raises(LoramixError, match="x: the dataset has no samples"):
        generate(make_bank(tmp_path / "bank", n=2), Dataset([], "x"), tmp_path / "out", check=0)
    assert not (tmp_path / "out").exists()


def test_leave_one_out_needs_two_entries(tmp_path):
    from loramix.pipeline import leave_one_out

    with pytest.raises(LoramixError, match="leave-one-out needs at least 2 entries with data, found 1"):
        leave_one_out(make_bank(tmp_path / "bank", n=1), tmp_path / "loo")


@pytest.mark.parametrize("field,value", [("coefficients", {"task_animals": float("nan")}), ("coefficients", [1]),
                                         ("rank", "x"), ("config.top_k", [1]), ("config.temperature", True),
                                         ("config.temperature", -1.0)])
def test_a_hand_edited_report_of_the_wrong_types_is_refused(tmp_path, field, value):
    from loramix import generate, read_report

    generate(make_bank(tmp_path / "bank", n=2), write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4)),
             tmp_path / "out", check=0)
    path = tmp_path / "out" / "loramix.json"
    raw = json.loads(path.read_text())
    part, _, key = field.rpartition(".")
    (raw[part] if part else raw)[key] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(LoramixError, match=f"loramix.json: field '{field}' must be|loramix.json: field '{part}': {key} must be"):
        read_report(tmp_path / "out")


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_base):
    from loramix.runtime.pytorch import load_tokenizer
    from loramix.prompts import prompt_ids

    with pytest.raises(LoramixError, match=r"the prompt is not UTF-8 text \(byte 0: a lone surrogate U\+DCFF\)"):
        prompt_ids(load_tokenizer(str(tiny_base)), b"\xff".decode("utf-8", "surrogateescape"))


def test_the_index_key_must_be_a_regular_file(tmp_path, monkeypatch):
    import os

    from loramix.store import index_key

    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path))
    os.mkfifo(tmp_path / "index.key")
    with pytest.raises(LoramixError, match="index.key: not a regular file"):
        index_key()


def test_index_files_and_folders_swapped_are_recomputed(tmp_path):
    import shutil

    from loramix.index import BankIndex
    from loramix.signatures import SignatureSpec

    root = make_bank(tmp_path / "bank", n=2)
    spec = SignatureSpec("embed", max_samples=4)
    first = BankIndex(Bank(root)).signatures(spec)
    for f in (root / ".loramix" / "signatures").rglob("*.npy"):
        f.unlink()
        f.mkdir()  # a folder where a cached file was
    assert all((a == b).all() for a, b in zip(first, BankIndex(Bank(root)).signatures(spec)))
    shutil.rmtree(root / ".loramix" / "signatures")
    (root / ".loramix" / "signatures").write_text("x")  # a file where the folder belongs
    assert all((a == b).all() for a, b in zip(first, BankIndex(Bank(root)).signatures(spec)))


def test_pattern_keys_are_bounded_and_compiled_once(tmp_path):
    from loramix.adapter.patterns import MAX_PATTERN_KEYS

    folder = write_adapter(tmp_path / "ad")
    _config(folder, rank_pattern={f"zz{i}": 4 for i in range(MAX_PATTERN_KEYS + 1)})
    with pytest.raises(LoramixError, match="field 'rank_pattern' has 10,001 keys"):
        LoraAdapter(folder)
    _config(folder, rank_pattern={f"zz{i}": 4 for i in range(5000)})
    start = time.perf_counter()
    LoraAdapter(folder)
    LoraAdapter(folder)
    assert time.perf_counter() - start < 20
