"""Outputs CPU users run: a GGUF LoRA adapter for llama.cpp / Ollama, and a merged model for transformers.

The GGUF follows llama.cpp's own converter (convert_lora_to_gguf.py): general.type 'adapter', adapter.type
'lora', adapter.lora.alpha, and per adapted weight `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r]; for
llama-family models the rows of q_proj / k_proj are permuted to llama.cpp's rotary layout, so lora_b's rows are
permuted the same way. llama.cpp scales each module by alpha / r (r from the tensor): per-module PEFT scales
that one alpha cannot express are folded into lora_b."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .adapter import DTYPES, LoraAdapter
from .errors import LoramixError
from .files import atomic_dir

# transformers architecture -> (gguf architecture, whether q/k rows are permuted to llama.cpp's rope layout)
GGUF_ARCHS = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
GGUF_TYPES = {"f32": "float32", "f16": "float16"}  # GGUF tensor type -> dtype name (loramix.adapter.DTYPES)


def _base_config(adapter: LoraAdapter, base: str | None) -> dict[str, Any]:
    """config.json of the base model: `base`, else the adapter's base_model_name_or_path (weights not loaded)."""
    from transformers import AutoConfig

    from .models import resolve_base

    name = base if base is not None else adapter.base_model
    try:
        return AutoConfig.from_pretrained(resolve_base(name)).to_dict()
    except OSError as e:
        raise LoramixError(f"cannot read the config of base model {name!r}: {str(e).splitlines()[0]} (pass --base)") from None


def rope_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's reordering of q/k projection rows: within each head, interleaved rotary pairs become halves.
    `rows` is [out, ...] with out = heads * head_dim."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def export_gguf(
    adapter_dir: str | Path, out_file: str | Path, *, base: str | None = None, dtype: str = "f32", allow_pickle: bool = False
) -> Path:
    """Write a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp loads with its base model's GGUF."""
    import gguf

    if dtype not in GGUF_TYPES:
        raise LoramixError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {dtype!r}")
    adapter = LoraAdapter(adapter_dir, allow_pickle=allow_pickle)
    cfg = _base_config(adapter, base)
    arch_name = (cfg.get("architectures") or ["?"])[0]
    if arch_name not in GGUF_ARCHS:
        raise LoramixError(f"GGUF export supports {', '.join(GGUF_ARCHS)}; the base model is {arch_name}")
    arch, permute = GGUF_ARCHS[arch_name]
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg["num_hidden_layers"])
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    # one alpha for the file: the most common scale * rank; other modules' scales are folded into lora_b
    products = [m.scale * m.rank for m in adapter.modules.values()]
    alpha = max(set(products), key=products.count)
    tensor_dtype = DTYPES[GGUF_TYPES[dtype]]
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for module, spec in sorted(adapter.modules.items()):
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise LoramixError(f"{adapter.name}: module '{module}' has no GGUF name for architecture {arch}")
        a, b = (t.float() for t in adapter.factors(module))
        b = b * (spec.scale * spec.rank / alpha)
        if permute and module.endswith("q_proj"):
            b = rope_permute(b, heads)
        elif permute and module.endswith("k_proj"):
            b = rope_permute(b, kv_heads)
        writer.add_tensor(f"{target}.lora_a", a.to(tensor_dtype).numpy())
        writer.add_tensor(f"{target}.lora_b", b.to(tensor_dtype).numpy())
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def export_merged(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None, force: bool = False) -> Path:
    """Merge the adapter into its base model's weights (PEFT merge_and_unload) and save a safetensors model folder
    (config, weights, tokenizer) that transformers loads without PEFT."""
    from peft import PeftModel

    from .models import load_model, load_tokenizer, quiet_loading

    adapter = LoraAdapter(adapter_dir)  # validated before a model is loaded
    name = base if base is not None else adapter.base_model
    model = load_model(name)
    with quiet_loading():
        merged = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
    with atomic_dir(out_dir, force=force) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(name).save_pretrained(tmp)
    return Path(out_dir)
