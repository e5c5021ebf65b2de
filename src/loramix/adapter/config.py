"""adapter_config.json as PEFT reads it: the fields loramix understands and their types (`check_config`,
`read_config`), the modules PEFT puts a LoRA layer on (`applied_by_peft`: target_modules, exclude_modules,
layers_to_transform; PEFT's default targets for the base's architecture when target_modules is null; all-linear
without the output layer: `resolve_targets`, `base_modules`), the name of a module's tensors and layer. Patterns are
matched by patterns.py. Tested against PEFT itself (tests/test_peft_differential.py)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ..errors import LoramixError
from ..files import CONFIG_FILE, parse_json
from .patterns import MAX_PATTERN_KEYS, match, pattern, prematch

# PEFT's TaskType values: PeftConfig refuses any other task_type
TASK_TYPES = frozenset({"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})
ALL_LINEAR = "all-linear"
# PEFT's tensors are named TENSOR_PREFIX + module + '.lora_A.weight' (or B)
TENSOR_PREFIX = "base_model.model."

# The adapter_config.json fields loramix understands (PEFT 0.22's LoraConfig and PeftConfig, and older). Any other
# field is refused when set (not null, false, 0 or empty): it may change the update beyond scale * B @ A.
# Composed: checked here or by bank.check_entries, and honoured (which modules are adapted, the tensors say).
_COMPOSED = frozenset({
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "bias", "init_lora_weights", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
})
# Metadata: provenance, and settings of training (dropout, VeLoRA's backward pass) or of initialisation (the
# configs of LoftQ, EVA, CorDA, LoRA-GA, which init_lora_weights selects): a saved adapter's update does not depend
# on them.
_METADATA = frozenset({
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version", "auto_mapping",
    "lora_dropout", "runtime_config", "megatron_core", "qalora_group_size", "velora_config",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})
# Why the PEFT fields loramix knows but cannot compose are refused.
_REFUSED_FIELDS = {
    "use_dora": "DoRA adds a magnitude vector that a sum of low-rank updates cannot express",
    "lora_bias": "LoRA bias terms are not composed",
    "modules_to_save": "fully trained modules (modules_to_save) are not composed",
    "trainable_token_indices": "trainable token embeddings are not composed",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "layer_replication": "layer replication is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QA-LoRA pools the input and is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing is not a fixed update",
    "megatron_config": "Megatron-parallel LoRA is not supported",
    "kasa_config": "KaSA puts learnable singular values between A and B and changes the base weights",
    "monteclora_config": "MonteCLoRA samples its update, which is not a fixed one",
    "ensure_weight_tying": "the update is also applied to the layers tied to its targets, which is not composed",
}
_UNKNOWN_FIELD = "loramix does not know this field, so it cannot tell that the update is scale * B @ A"
# init_lora_weights values under which the update is a plain LoRA over the unchanged base weights. The others
# (pissa*, olora, corda, loftq, lora_ga) change the base weights, so the adapter holds only over those (PEFT
# converts such an adapter to a plain LoRA with path_initial_model_for_weight_conversion).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _number(v: Any) -> bool:
    """A finite int or float (not a bool; an integer beyond a float's range is not: PEFT's alpha / r overflows)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) <= sys.float_info.max
    return isinstance(v, float) and math.isfinite(v)


def _names(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _mapping(value_ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(value_ok(x) for x in v.values())


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0  # PEFT cannot build a layer of rank 8.0


# What each understood field must hold when it is set (null means PEFT's default): (check, description).
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_whole, "a positive integer"),
    "lora_alpha": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (_mapping(_whole), "an object of positive integers"),
    "alpha_pattern": (_mapping(lambda v: _number(v) and v > 0), "an object of positive finite numbers"),
    "target_modules": (_names, "a string or a list of strings"),
    "exclude_modules": (_names, "a string or a list of strings"),
    "bias": (lambda v: isinstance(v, str), "a string"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a string"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "layers_to_transform": (lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
        isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)), "a layer index or a list of them"),
    "layers_pattern": (_names, "a string or a list of strings"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
    "revision": (lambda v: isinstance(v, str), "a string"),
    "task_type": (lambda v: isinstance(v, str) and v in TASK_TYPES, "one of PEFT's task types (" + ", ".join(sorted(TASK_TYPES)) + ")"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "peft_version": (lambda v: isinstance(v, str), "a string"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
}


def check_config(config: Any, name: str) -> dict[str, Any]:
    """`config` (an adapter_config.json as parsed) if it is an object whose understood fields have the types PEFT
    gives them and whose regular expressions compile; else a LoramixError naming `name` and the field."""
    if not isinstance(config, dict):
        raise LoramixError(f"{name}: {CONFIG_FILE}: expected a JSON object")
    for field_name, (ok, want) in _FIELD_TYPES.items():
        value = config.get(field_name)
        if value is not None and not ok(value):
            raise LoramixError(f"{name}: {CONFIG_FILE}: field '{field_name}' must be {want}, got {repr(value)[:100]}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        if len(config.get(field_name) or {}) > MAX_PATTERN_KEYS:
            raise LoramixError(f"{name}: {CONFIG_FILE}: field '{field_name}' has {len(config[field_name]):,} keys "
                               f"(at most {MAX_PATTERN_KEYS:,}: one per module of the largest models)")
        for key in config.get(field_name) or {}:
            pattern(rf"(.*\.)?({key})$", f"{name}: {CONFIG_FILE}: field '{field_name}'")
    for field_name in ("target_modules", "exclude_modules"):
        if isinstance(config.get(field_name), str):
            pattern(config[field_name], f"{name}: {CONFIG_FILE}: field '{field_name}'")
    layer_names = config.get("layers_pattern") or []
    for key in [layer_names] if isinstance(layer_names, str) else layer_names:
        pattern(rf"(?:^|.*?\.){key}\.(\d+)\.", f"{name}: {CONFIG_FILE}: field 'layers_pattern'")
    for field_name in ("layers_to_transform", "layers_pattern"):  # PEFT's LoraConfig refuses these too
        if isinstance(config.get("target_modules"), str) and config.get(field_name) is not None:
            raise LoramixError(f"{name}: {CONFIG_FILE}: field '{field_name}' is set but 'target_modules' is a regular "
                               "expression: PEFT refuses this config")
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        raise LoramixError(f"{name}: {CONFIG_FILE}: field 'layers_pattern' is set without 'layers_to_transform': "
                           "PEFT refuses this config")
    return config


def applied_by_peft(config: dict[str, Any], module: str, name: str, output_layer: str = "lm_head") -> bool:
    """Whether PEFT (0.22's check_target_module_exists) puts a LoRA layer on `module` (e.g.
    model.layers.3.self_attn.q_proj) under this config. Excluded by `exclude_modules` (a string: a regex matched
    against the whole name; a list: equal names, or names ending in '.' + an item). Selected by `target_modules`:
    a string is such a regex; a list selects equal names outright, and names ending in '.' + an item only in the
    layers `layers_to_transform` lists (when set), the layer index being the first number after `layers_pattern`
    (or after the first name part followed by a number). 'all-linear' selects every module but the base's
    `output_layer` (which ones are linear, the tensors say). `target_modules` null is resolved before this
    (`resolve_targets`)."""
    what = f"{name}: {CONFIG_FILE}"
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if match(excluded, module, f"{what}: field 'exclude_modules'") is not None:
                return False
        elif module in excluded or any(module.endswith(f".{key}") for key in excluded):
            return False
    targets = config.get("target_modules")
    if targets is None:
        raise LoramixError(f"{what}: field 'target_modules' is null")  # resolve_targets fills it
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return module != output_layer
    if isinstance(targets, str):
        return match(targets, module, f"{what}: field 'target_modules'") is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{key}") for key in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layer_names = config.get("layers_pattern") or []
    found = None
    if not layer_names:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        found = found.groupdict() if found else None
    for key in [layer_names] if isinstance(layer_names, str) else layer_names:
        found = match(rf"(?:^|.*?\.){key}\.(?P<idx>\d+)\.", module, f"{what}: field 'layers_pattern'", full=False)
        if found is not None:
            break
    if found is None or found.get("idx") is None:
        return False
    index = int(found["idx"])
    return index == layers if isinstance(layers, int) else index in layers


@dataclass(frozen=True)
class BaseModules:
    """What PEFT sees of a base model when it loads an adapter on it: `model_type`, the name of its `output_layer`
    (get_output_embeddings), and every named module's kind ('linear': nn.Linear or transformers' Conv1D; 'other'
    a layer PEFT also adapts: embedding, convolution, multi-head attention; None: one it cannot adapt)."""

    model_type: str
    output_layer: str
    kinds: dict[str, str | None]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # linear modules' [out, in], as PEFT sizes A, B


def resolve_targets(config: dict[str, Any], name: str) -> tuple[dict[str, Any], BaseModules | None]:
    """(`config` as PeftModel applies it on its base (`base_model_name_or_path`), that base's modules or None): a
    null target_modules becomes PEFT's default for the base's architecture, 'all-linear' the base's linear modules
    but its output layer. The base's config is read locally (a folder, a local GGUF, the default base, the hub cache;
    never downloaded); where it is, what PEFT refuses is refused: targets that select no module of the base, or a
    module PEFT cannot adapt. A null target_modules whose base cannot be read, or whose architecture PEFT has no
    default for, is refused; 'all-linear' without the base leaves out 'lm_head' (transformers' output layer)."""
    what = f"{name}: {CONFIG_FILE}: field 'target_modules'"
    base = config.get("base_model_name_or_path")
    modules = base_modules(base)
    targets = config.get("target_modules")
    if targets is None:
        if modules is None:
            raise LoramixError(f"{what} is null, so PEFT uses its default for the base's architecture, and base model "
                               f"{base!r}'s config cannot be read here: name the modules in target_modules")
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        default = DEFAULTS.get(modules.model_type)
        if default is None:
            raise LoramixError(f"{what} is null and PEFT has no default for '{modules.model_type}' (PEFT refuses this "
                               "config): name the modules in target_modules")
        config = {**config, "target_modules": default if isinstance(default, str) else sorted(default)}
    elif isinstance(targets, str) and targets.lower() == ALL_LINEAR and modules is not None:
        config = {**config, "target_modules": sorted(n for n, kind in modules.kinds.items()
                                                     if kind == "linear" and n != modules.output_layer)}
    if modules is not None:
        refused = _refused_on(json.dumps(config, sort_keys=True), name)
        if refused:
            raise LoramixError(f"{what} {refused} (PEFT refuses this config)")
    return config, modules


@lru_cache(maxsize=1024)
def _refused_on(config_json: str, name: str) -> str | None:
    """Why PEFT refuses the config on its base (whose modules are known), or None (memoised: a bank's entries share
    their configs)."""
    config = json.loads(config_json)
    base = config.get("base_model_name_or_path")
    modules = base_modules(base)
    prematch(config, list(modules.kinds))
    chosen = [n for n in modules.kinds if applied_by_peft(config, n, name, modules.output_layer)]
    if not chosen:
        return f"selects no module of base model {base!r}"
    cannot = [n for n in chosen if modules.kinds[n] is None]
    if cannot:
        return f"selects '{cannot[0]}', a module of base model {base!r} that PEFT cannot put a LoRA layer on"
    return None


@lru_cache(maxsize=16)
def base_modules(base: str | None) -> BaseModules | None:
    """The BaseModules of base model `base`, from its config found without a download, the model built on the meta
    device; None where there is no such config."""
    from ..runtime.pytorch import DEFAULT_BASE, load_config

    try:
        if base in (None, "default", DEFAULT_BASE) or Path(str(base)).expanduser().exists():
            config = load_config(base)
        else:
            from huggingface_hub import try_to_load_from_cache
            from transformers import AutoConfig

            cached = try_to_load_from_cache(str(base), "config.json")
            if not isinstance(cached, str):
                return None
            config = AutoConfig.from_pretrained(str(Path(cached).parent))
        return _built(config)
    except (LoramixError, OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError):
        return None


def _built(config: Any) -> BaseModules:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ..runtime.pytorch import quiet_loading

    with torch.device("meta"), quiet_loading():
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    nn = torch.nn
    kinds = {n: "linear" if isinstance(m, (nn.Linear, Conv1D)) else "other" if isinstance(
        m, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)) else None
        for n, m in model.named_modules() if n}
    output = next((n for n, m in model.named_modules() if m is head), "lm_head") if head is not None else "lm_head"
    # [out, in] of each linear module: nn.Linear's weight is [out, in], transformers' Conv1D's [in, out]
    shapes = {n: (m.out_features, m.in_features) if isinstance(m, nn.Linear) else (m.weight.shape[1], m.weight.shape[0])
              for n, m in model.named_modules() if n and kinds.get(n) == "linear"}
    return BaseModules(config.model_type, output, kinds, shapes)


def layer_of(module: str) -> int:
    """The layer index of a module name (its first dotted integer: model.layers.3.self_attn.q_proj -> 3; -1 if none)."""
    m = re.search(r"\.(\d+)(\.|$)", module)
    return int(m.group(1)) if m else -1


def read_config(folder: str | Path, name: str | None = None) -> dict[str, Any]:
    """The adapter_config.json of an adapter folder: a JSON object whose understood fields are type-checked
    (`check_config`); whether loramix can compose it is not. Errors name `name` (default: the folder's name)."""
    folder = Path(folder)
    name = name or folder.name
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise LoramixError(f"{name}: {CONFIG_FILE} is not a regular file" if os.path.lexists(file) else
                           f"{name}: no {CONFIG_FILE} in {folder}")
    raw = file.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # PEFT reads it as UTF-8 text, where json refuses a byte-order mark
        raise LoramixError(f"{name}: {CONFIG_FILE} begins with a UTF-8 byte-order mark, which PEFT cannot read; save it "
                           "without one")
    return check_config(parse_json(raw, f"{name}: {CONFIG_FILE}"), name)


def base_model_of(folder: str | Path) -> str | None:
    """The base model an adapter folder's config names (base_model_name_or_path); the adapter is not validated
    otherwise (PEFT loads adapters that loramix cannot compose)."""
    return read_config(folder).get("base_model_name_or_path")
