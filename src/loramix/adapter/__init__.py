"""PEFT LoRA adapters on disk, one module per role:

- `config`: adapter_config.json as PEFT reads it (its fields and their types, the modules PEFT applies a LoRA on);
- `patterns`: PEFT's regular expressions, matched as PEFT matches them, each match bounded in time;
- `safetensors`: a safetensors file's header and tensor spans read and validated, the dtype tables;
- `reader`: an adapter folder read lazily (`LoraAdapter`, `LoraModule`); it never imports the writer;
- `writer`: an adapter written (`save_adapter`, `lora_config`, `SafetensorsWriter`, `cast_factors`)."""

from ..files import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE
from .config import TENSOR_PREFIX, applied_by_peft, base_model_of, layer_of, read_config
from .patterns import pattern_value
from .reader import LoraAdapter, LoraModule
from .safetensors import DTYPES
from .writer import SafetensorsWriter, cast_factors, lora_config, save_adapter, update_peak

__all__ = [
    "CONFIG_FILE", "DTYPES", "PICKLE_FILE", "TENSOR_PREFIX", "WEIGHTS_FILE", "LoraAdapter", "LoraModule", "SafetensorsWriter",
    "applied_by_peft", "base_model_of", "cast_factors", "layer_of", "lora_config", "pattern_value", "read_config",
    "save_adapter", "update_peak",
]
