"""GGUF LoRA export (structure, names, rope permutation, scales) and merged-model export."""

import json

import numpy as np
import pytest
import torch
from helpers import make_bank, topic_records, write_jsonl

from loramix import LoraAdapter, generate
from loramix.export import export_gguf, export_merged, rope_permute


def test_rope_permute_matches_llama_cpp_layout():
    heads, d = 3, 8
    rows = torch.arange(heads * d, dtype=torch.float32)[:, None]
    new = rope_permute(rows, heads)
    for h in range(heads):
        for i in range(d // 2):
            for c in range(2):  # HF pairs (i, i + d/2) become llama.cpp's interleaved (2i, 2i + 1)
                assert new[h * d + 2 * i + c, 0] == rows[h * d + c * d // 2 + i, 0]


@pytest.fixture
def adapter(tmp_path, tiny_base):
    bank = make_bank(tmp_path / "bank", base=str(tiny_base), mixed=True, n=5)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 10))
    generate(bank, data, tmp_path / "out", compose="exact", rank=4, max_samples=8, refine=0)
    return tmp_path / "out"


def test_gguf_structure_and_values(tmp_path, adapter, tiny_base):
    from gguf import GGUFReader

    out = export_gguf(adapter, tmp_path / "a.gguf")
    reader = GGUFReader(out)

    def field(key):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("general.architecture") == "llama" and field("general.type") == "adapter"
    assert field("adapter.type") == "lora" and float(field("adapter.lora.alpha")) == 4.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 12 and "blk.1.attn_k.weight.lora_b" in tensors
    ad = LoraAdapter(adapter)
    cfg = json.loads((tiny_base / "config.json").read_text())
    for layer in range(2):
        for proj, short, heads in (("q_proj", "attn_q", cfg["num_attention_heads"]), ("k_proj", "attn_k", cfg["num_key_value_heads"]), ("v_proj", "attn_v", None)):
            a, b = ad.factors(f"model.layers.{layer}.self_attn.{proj}")
            ga = np.asarray(tensors[f"blk.{layer}.{short}.weight.lora_a"].data)
            gb = np.asarray(tensors[f"blk.{layer}.{short}.weight.lora_b"].data)
            assert ga.shape == tuple(a.shape) and gb.shape == tuple(b.shape)
            want_b = rope_permute(b.float(), heads) if heads else b.float()
            assert np.allclose(ga, a.float().numpy()) and np.allclose(gb, want_b.numpy())


def test_gguf_folds_per_module_scales(tmp_path):
    from gguf import GGUFReader

    from helpers import write_adapter

    folder = write_adapter(tmp_path / "ad", rank=4, alpha=8, rank_pattern={"model.layers.1.self_attn.v_proj": 2},
                           alpha_pattern={"model.layers.0.self_attn.v_proj": 3},
                           base=None, config_extra={})
    base_cfg = tmp_path / "base"
    base_cfg.mkdir()
    (base_cfg / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32, "vocab_size": 10}))
    out = export_gguf(folder, tmp_path / "x.gguf", base=str(base_cfg), dtype="f16")
    reader = GGUFReader(out)
    tensors = {t.name: np.asarray(t.data).astype(np.float64) for t in reader.tensors}
    ad = LoraAdapter(folder)
    alpha = 8.0
    for name, short in (("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight"), ("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight")):
        a, b = tensors[f"{short}.lora_a"], tensors[f"{short}.lora_b"]
        llama_cpp_delta = alpha / a.shape[0] * (b @ a)  # llama.cpp: alpha / rank of the tensor
        want = ad.delta(name).numpy()
        assert np.linalg.norm(llama_cpp_delta - want) / np.linalg.norm(want) < 2e-3  # f16 storage


def test_gguf_refuses_unknown_architectures(tmp_path, adapter):
    base_cfg = tmp_path / "gpt"
    base_cfg.mkdir()
    (base_cfg / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    from loramix import LoramixError

    with pytest.raises(LoramixError, match="GGUF export supports"):
        export_gguf(adapter, tmp_path / "x.gguf", base=str(base_cfg))


def test_merged_model_equals_peft(tmp_path, adapter, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_merged(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).eval()
    ids = torch.tensor([[1, 7, 9, 4]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()


def test_cli_export_and_try(tmp_path, adapter):
    from typer.testing import CliRunner

    from loramix.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["export", "gguf", "--adapter", str(adapter), "--out", str(tmp_path / "a.gguf")])
    assert r.exit_code == 0 and (tmp_path / "a.gguf").is_file(), r.output
    r = runner.invoke(app, ["export", "merged", "--adapter", str(adapter), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0 and (tmp_path / "m" / "model.safetensors").is_file(), r.output
    r = runner.invoke(app, ["try", "--adapter", str(adapter), "--prompt", "give me some fruits words", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert "base:" in r.output and "adapter:" in r.output
    r = runner.invoke(app, ["try", "--adapter", str(adapter), "--max-new-tokens", "2"], input="cat dog\n\n")
    assert r.exit_code == 0 and r.output.count("adapter:") == 1, r.output
