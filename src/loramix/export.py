"""Outputs CPU users run: a GGUF LoRA adapter for llama.cpp / Ollama, and a merged model for transformers.

The GGUF follows llama.cpp's own converter (convert_lora_to_gguf.py): general.type 'adapter', adapter.type
'lora', adapter.lora.alpha, and per adapted weight `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r]; for
llama-family models the rows of q_proj / k_proj are permuted to llama.cpp's rotary layout, so lora_b's rows are
permuted the same way. llama.cpp scales each module by alpha / r (r from the tensor): per-module PEFT scales
that one alpha cannot express are folded into lora_b."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .adapter import DTYPES, LoraAdapter, cast_factors
from .arguments import checked
from .errors import LoramixError, setting
from .files import atomic_dir, hidden_stem, naming, publish, refuse_target
from .runtime import base_paths

# transformers architecture -> (gguf architecture, whether q/k rows are permuted to llama.cpp's rope layout)
GGUF_ARCHS = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
GGUF_TYPES = {"f32": "float32", "f16": "float16"}  # GGUF tensor type -> dtype name (loramix.adapter.DTYPES)


def _base_config(adapter: LoraAdapter, base: str | None) -> Any:
    """The base model's config (`base`, else the adapter's base_model_name_or_path; weights not loaded), checked to
    be an architecture GGUF export knows and to hold every adapted module with the adapter's [out, in] shape (on a
    model built on the meta device)."""
    from transformers import AutoModelForCausalLM

    from .runtime.pytorch import load_config, quiet_loading

    name = base if base is not None else adapter.base_model
    config = load_config(name)
    arch_name = (config.architectures or ["?"])[0]
    if arch_name not in GGUF_ARCHS:
        raise LoramixError(f"GGUF export supports {', '.join(GGUF_ARCHS)}; the base model is {arch_name}")
    try:
        with torch.device("meta"), quiet_loading():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise LoramixError(f"cannot build base model {name!r} from its config: {str(e).splitlines()[0][:200]}") from None
    for module, spec in sorted(adapter.modules.items()):
        try:
            shape = tuple(model.get_submodule(module).weight.shape)
        except AttributeError:
            raise LoramixError(f"{adapter.name}: module '{module}' is not in base model {name!r}") from None
        if shape != (spec.out_features, spec.in_features):
            raise LoramixError(f"{adapter.name}: module '{module}' is [{spec.out_features}, {spec.in_features}] ([out, in]) "
                               f"but base model {name!r} has {list(shape)}")
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        if tied and model.get_output_embeddings() is model.get_submodule(module):
            raise LoramixError(f"{adapter.name}: module '{module}' is the output layer, which base model {name!r} ties to "
                               "its input embeddings: a GGUF of this base has no output weight for llama.cpp to apply "
                               f"the LoRA to (PyTorch runs it: {setting('runtime', 'torch')})")
    return config


def balanced(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with each rank component i rescaled (A_i * s_i, B_i / s_i) so that row i of A and column
    i of B have equal norms: B @ A is unchanged, and neither factor holds the magnitude alone (a half-precision file
    keeps what one factor of 1e5 and another of 1e-6 would lose)."""
    na, nb = a.norm(dim=1), b.norm(dim=0)
    s = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    return a * s[:, None], b / s[None, :]


def rope_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's reordering of q/k projection rows: within each head, interleaved rotary pairs become halves.
    `rows` is [out, ...] with out = heads * head_dim."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@checked
def export_gguf(
    adapter_dir: str | Path, out_file: str | Path, *, base: str | None = None, dtype: str = "f32",
    allow_pickle: bool = False, force: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp loads with its base model's GGUF (an existing
    `out_file` only with `force`)."""
    import gguf

    if dtype not in GGUF_TYPES:
        raise LoramixError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {dtype!r}")
    adapter = LoraAdapter(adapter_dir, allow_pickle=allow_pickle)
    refuse_target(out_file, force=force, folder=False, inputs={"the adapter": adapter.path,
                                                                  "the base model": base_paths(base if base is not None else adapter.base_model)})
    cfg = _base_config(adapter, base)
    arch, permute = GGUF_ARCHS[cfg.architectures[0]]
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
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
        a, b = balanced(*(t.double() for t in adapter.factors(module)))
        b = b * (spec.scale * spec.rank / alpha)
        if permute and module.endswith("q_proj"):
            b = rope_permute(b, heads)
        elif permute and module.endswith("k_proj"):
            b = rope_permute(b, kv_heads)
        a, b = cast_factors(module, a, b, alpha / spec.rank, tensor_dtype, f"{setting('dtype')} (f32)")
        writer.add_tensor(f"{target}.lora_a", a.numpy())
        writer.add_tensor(f"{target}.lora_b", b.numpy())
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out_file.parent, prefix=f".{hidden_stem(out_file.name)}.", suffix=".tmp")  # one per run
    os.close(fd)
    tmp = Path(name)
    try:
        with naming(out_file):  # a full disk names the GGUF file
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        publish(tmp)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def _untie_adapted(model: Any, adapter: LoraAdapter, name: str | None) -> None:
    """Give each module the adapter changes a weight of its own where the base shares it with another module (tied
    input and output embeddings: SmolLM2's, Llama 3.2's): merging the update into a shared weight would change the
    other module too (the input embeddings), so the merged model would not be base + adapter. The output embeddings
    are then saved untied (config tie_word_embeddings false); any other sharing is refused in one line."""
    shared: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(p.data_ptr(), []).append(pname)
    output = model.get_output_embeddings()
    untied = False
    for module in sorted(adapter.modules):
        try:
            weight = model.get_submodule(module).weight
        except AttributeError:  # not in the base: with_adapter says so
            continue
        owners = shared.get(weight.data_ptr(), [])
        if len(owners) < 2:
            continue
        if output is None or model.get_submodule(module) is not output:
            others = ", ".join(o for o in owners if o != f"{module}.weight")
            raise LoramixError(f"{adapter.name}: module '{module}' shares its weight with {others} in base model "
                               f"{name!r}; merging would change both, so the merged model would not be base + adapter")
        output.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        untied = True
    if untied:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False


@checked
def export_merged(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None, force: bool = False) -> Path:
    """Merge the adapter into its base model's weights (PEFT merge_and_unload) and save a safetensors model folder
    (config, weights, tokenizer) that transformers loads without PEFT: base + adapter, nothing else (weights the base
    ties to an adapted one are untied first: `_untie_adapted`)."""
    from .runtime.pytorch import load_model, load_tokenizer, quiet_loading, with_adapter

    adapter = LoraAdapter(adapter_dir)  # validated before a model is loaded
    name = base if base is not None else adapter.base_model
    refuse_target(out_dir, force=force, inputs={"the adapter": adapter.path, "the base model": base_paths(name)})
    model = load_model(name)
    _untie_adapted(model, adapter, name)
    merged = with_adapter(model, adapter.path, name).merge_and_unload()
    with atomic_dir(out_dir, force=force) as tmp, quiet_loading():  # no transformers progress bar of its own
        merged.save_pretrained(tmp)
        load_tokenizer(name).save_pretrained(tmp)
    return Path(out_dir)
