import json
import logging

import pytest
import torch
from helpers import TINY_SHAPES, make_bank, topic_records, write_adapter, write_jsonl
from safetensors.torch import save_file

from loramix import Bank, BankIndex, LoraAdapter, LoramixError, SignatureSpec


def _edit_config(folder, **fields):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "fields,pattern",
    [
        ({"use_dora": True}, "field 'use_dora' is set"),
        ({"lora_bias": True}, "field 'lora_bias' is set"),
        ({"modules_to_save": ["lm_head"]}, "field 'modules_to_save' is set"),
        ({"bias": "all"}, "field 'bias' is 'all'"),
        ({"peft_type": "IA3"}, "only LORA adapters"),
        ({"r": 0}, "field 'r' must be a positive integer"),
        ({"r": 8}, "rank 8 for module"),
        ({"rank_pattern": ["x"]}, "field 'rank_pattern' must be an object"),
        ({"kasa_config": {"beta": 1e-4}}, "field 'kasa_config' is set: KaSA"),
        ({"monteclora_config": {"num_samples": 4}}, "field 'monteclora_config' is set"),
        ({"some_future_field": 1}, "field 'some_future_field' is set: loramix does not know this field"),
        ({"init_lora_weights": "pissa"}, "field 'init_lora_weights' is 'pissa': only adapters over unchanged base weights"),
        ({"init_lora_weights": "loftq"}, "field 'init_lora_weights' is 'loftq'"),
    ],
)
def test_refused_configs_name_entry_and_field(tmp_path, fields, pattern):
    root = make_bank(tmp_path / "bank", n=3)
    _edit_config(root / "task_colors", **fields)
    with pytest.raises(LoramixError, match=pattern) as info:
        Bank(root)
    assert str(info.value).startswith("task_colors: ") and "\n" not in str(info.value)


def test_a_config_saved_by_peft_is_accepted(tmp_path):
    from peft import LoraConfig

    from loramix import LoraAdapter

    folder = write_adapter(tmp_path / "ad", rank=4, alpha=8, use_rslora=True, rank_pattern={"model.layers.1.self_attn.q_proj": 2})
    LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"model.layers.1.self_attn.q_proj": 2}, lora_dropout=0.1,
               target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights="gaussian", task_type="CAUSAL_LM",
               base_model_name_or_path="tiny-base").save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert {"kasa_config", "monteclora_config", "use_dora", "megatron_core"} <= set(cfg)  # PEFT writes every field
    adapter = LoraAdapter(folder)
    assert adapter.base_model == "tiny-base" and adapter.modules["model.layers.1.self_attn.q_proj"].rank == 2
    assert adapter.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    _edit_config(folder, some_future_field=None, kasa_config={})  # unknown or refused, but unset
    LoraAdapter(folder)


def test_refused_tensors(tmp_path):
    root = tmp_path / "bank"
    write_adapter(root / "a")
    folder = root / "dora"
    write_adapter(folder)
    t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.zeros(32)}
    save_file(t, folder / "adapter_model.safetensors")
    with pytest.raises(LoramixError, match="dora: .*lora_magnitude_vector.* is not a LoRA A/B weight"):
        Bank(root)
    save_file({k: v for k, v in t.items() if "lora_A" in k}, folder / "adapter_model.safetensors")
    with pytest.raises(LoramixError, match="has no lora_B tensor"):
        Bank(root)
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoramixError, match="unreadable safetensors"):
        Bank(root)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoramixError, match="pickle"):
        Bank(root)


def test_bank_level_checks(tmp_path):
    with pytest.raises(LoramixError, match="bank folder not found"):
        Bank(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoramixError, match="no adapter folders"):
        Bank(tmp_path / "empty")
    root = make_bank(tmp_path / "bank", n=2)
    write_adapter(root / "other_base", base="some/other-model")
    with pytest.raises(LoramixError, match="other_base: .*base_model_name_or_path.*one base model"):
        Bank(root)
    (root / "other_base" / "adapter_config.json").unlink()
    with pytest.raises(LoramixError, match="other_base: no adapter_config.json"):
        Bank(root)
    import shutil

    shutil.rmtree(root / "other_base")
    write_adapter(root / "wide", shapes={**TINY_SHAPES, "model.layers.0.self_attn.q_proj": (64, 32)})
    with pytest.raises(LoramixError, match=r"wide: module 'model.layers.0.self_attn.q_proj' is \[64, 32\]"):
        Bank(root)


def test_entry_without_data_is_listed_and_warned(tmp_path, caplog):
    root = make_bank(tmp_path / "bank", n=3)
    (root / "task_colors" / "train.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="loramix"):
        b = Bank(root)
    assert [e.name for e in b.entries] == ["task_animals", "task_colors", "task_fruits"]
    assert [e.name for e in b.usable] == ["task_animals", "task_fruits"]
    assert "task_colors: no train.jsonl" in caplog.text
    assert [e.samples for e in b.entries] == [24, None, 24]


def test_index_is_keyed_by_content(tmp_path, monkeypatch):
    root = make_bank(tmp_path / "bank", n=4)
    spec = SignatureSpec("embed", max_samples=8)
    index = BankIndex(Bank(root))
    assert not any(index.status(spec).values())
    first = index.signatures(spec)
    assert all(index.status(spec).values()) and first[0].shape == (8, 384)

    import loramix.signatures as sigmod

    calls = []
    original = sigmod.EmbedSigner.compute
    monkeypatch.setattr(sigmod.EmbedSigner, "compute", lambda self, ds: calls.append(ds.source) or original(self, ds))
    again = BankIndex(Bank(root)).signatures(spec)
    assert calls == [] and all((a == b).all() for a, b in zip(first, again))
    write_jsonl(root / "task_colors" / "train.jsonl", topic_records("colors", seed=7))
    index = BankIndex(Bank(root))
    assert index.status(spec) == {"task_animals": True, "task_colors": False, "task_fruits": True, "task_numbers": True}
    index.signatures(spec)
    assert calls == [str(root / "task_colors" / "train.jsonl")]
    # another spec is another cache
    assert not any(index.status(SignatureSpec("embed", max_samples=4)).values())


def test_corrupted_cache_file_is_recomputed(tmp_path):
    root = make_bank(tmp_path / "bank", n=2)
    spec = SignatureSpec("embed", max_samples=4)
    index = BankIndex(Bank(root))
    first = index.signatures(spec)
    for f in (root / ".loramix" / "signatures").rglob("*.npy"):
        f.write_bytes(b"broken")
    again = BankIndex(Bank(root)).signatures(spec)
    assert all((a == b).all() for a, b in zip(first, again))


def test_spec_key():
    a = SignatureSpec("embed", "m", 10, 0)
    assert a.key() == SignatureSpec("embed", "m", 10, 0).key() and a.key().startswith("embed-")
    assert len({a.key(), SignatureSpec("embed", "m", 11, 0).key(), SignatureSpec("embed", "m", 10, 1).key(),
                SignatureSpec("hidden", "m", 10, 0).key()}) == 4


def test_pickle_adapters_need_allow_pickle_and_load_weights_only(tmp_path):
    from safetensors.torch import load_file

    from loramix import LoraAdapter

    folder = write_adapter(tmp_path / "p")
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(LoramixError, match="is a pickle and is not loaded by default"):
        LoraAdapter(folder)
    ad = LoraAdapter(folder, allow_pickle=True)
    m = "model.layers.0.self_attn.q_proj"
    assert torch.equal(ad.factors(m)[0], tensors[f"base_model.model.{m}.lora_A.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))

    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    with pytest.raises(LoramixError, match="not loadable as plain tensors"):
        LoraAdapter(folder, allow_pickle=True)


def test_checksum_catches_a_valid_but_wrong_cache_file(tmp_path):
    import numpy as np

    root = make_bank(tmp_path / "bank", n=2)
    spec = SignatureSpec("embed", max_samples=4)
    first = BankIndex(Bank(root)).signatures(spec)
    for f in (root / ".loramix" / "signatures").rglob("*.npy"):
        np.save(f, np.zeros((4, 384), dtype=np.float32))  # parses, but is not what was stored
        f.rename(f)  # np.save keeps the name when it ends in .npy
    again = BankIndex(Bank(root)).signatures(spec)
    assert all((a == b).all() for a, b in zip(first, again))


def test_truncated_weights_are_refused_with_the_entry_named(tmp_path):
    root = make_bank(tmp_path / "bank", n=2)
    f = root / "task_colors" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LoramixError, match="task_colors: adapter_model.safetensors"):
        b = Bank(root)
        for m in b.shapes:
            b.entry("task_colors").adapter.factors(m)


def test_adapters_sharing_a_header_are_each_read_under_their_own_config(tmp_path, caplog):
    """Byte-identical weights headers are parsed once per process, but each adapter's config still decides which
    modules are applied and at what scale, and each adapter reads its own tensors."""
    root = tmp_path / "bank"
    write_adapter(root / "a", seed=0)
    write_adapter(root / "b", seed=1, alpha=16)
    write_adapter(root / "c", seed=2, config_extra={"target_modules": ["q_proj", "v_proj"]})
    with caplog.at_level(logging.WARNING, logger="loramix"):
        a, b, c = (LoraAdapter(root / n) for n in "abc")
    assert (root / "a" / "adapter_model.safetensors").read_bytes()[:200] == (root / "b" / "adapter_model.safetensors").read_bytes()[:200]
    assert {m.scale for m in a.modules.values()} == {2.0} and {m.scale for m in b.modules.values()} == {4.0}
    assert sorted(c.modules) == sorted(m for m in TINY_SHAPES if not m.endswith("k_proj"))
    assert "c: 2 module(s) have tensors but are not selected" in caplog.text
    assert not torch.equal(a.factors(sorted(a.modules)[0])[0], b.factors(sorted(b.modules)[0])[0])
