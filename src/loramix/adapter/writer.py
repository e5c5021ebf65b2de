"""Writing PEFT LoRA adapters: `save_adapter` (adapter_config.json + adapter_model.safetensors), `lora_config` (a
plain LoRA's config), `SafetensorsWriter` (a large file written one tensor at a time) and `cast_factors` (factors
cast to an output dtype, refused where the cast loses them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..arguments import checked
from ..errors import LoramixError
from ..files import CONFIG_FILE, WEIGHTS_FILE
from .config import TENSOR_PREFIX
from .safetensors import _SAFETENSORS_DTYPES


def cast_factors(module: str, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype,
                 option: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) cast to `dtype`, refused (naming `module` and the `option` that picks the dtype) when
    that loses them: a factor overflows, a factor underflows (its Frobenius norm moves by more than 4 eps: rounding
    alone stays below eps), or the update scale * B @ A, what a merge in `dtype` holds, leaves its range."""
    cast = a.to(dtype), b.to(dtype)
    if not all(bool(torch.isfinite(t).all()) for t in cast):
        raise LoramixError(f"module '{module}': the update overflows {dtype} (choose another {option})")
    lost = max(_cast_error(x, y) for x, y in zip((a, b), cast))
    if lost > 4 * torch.finfo(dtype).eps:
        raise LoramixError(f"module '{module}': the factors lose {lost:.1%} of their size in {dtype} (they fall below its "
                           f"smallest normal number, {torch.finfo(dtype).tiny:.3g}); choose another {option}")
    limit = torch.finfo(dtype).max
    if (peak := update_peak(*cast, scale, limit)) > limit:
        raise LoramixError(f"module '{module}': the update reaches {peak:.3g}, beyond {dtype}'s range ({limit:.5g}); "
                           f"choose another {option}")
    return cast


def _cast_error(exact: torch.Tensor, cast: torch.Tensor) -> float:
    """||cast - exact|| / ||exact|| (Frobenius, float64; 0 for a zero tensor)."""
    norm = float(exact.double().norm())
    return float((cast.double() - exact.double()).norm()) / norm if norm > 0 else 0.0


def update_peak(a: torch.Tensor, b: torch.Tensor, scale: float, limit: float, rows: int = 1024) -> float:
    """max |scale * B @ A| for A [r, in], B [out, r] (float64), or, when it is within `limit`, possibly a bound on it:
    scale * (largest row norm of B) * (largest column norm of A) (Cauchy-Schwarz) is returned when it is within
    `limit`; otherwise the dense product is computed, `rows` of B at a time."""
    a, b = a.double(), b.double()
    bound = abs(scale) * float(b.norm(dim=1).max()) * float(a.norm(dim=0).max()) if a.numel() and b.numel() else 0.0
    if bound <= limit:
        return bound
    return max(abs(scale) * float((b[i : i + rows] @ a).abs().max()) for i in range(0, b.shape[0], rows))


def lora_config(
    *,
    base_model: str | None,
    target_modules: list[str],
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    task_type: str | None = "CAUSAL_LM",
    fan_in_fan_out: bool = False,
    layers_to_transform: Any = None,
    layers_pattern: Any = None,
) -> dict[str, Any]:
    """The adapter_config.json of a plain LoRA adapter (fields PEFT, vLLM and llama.cpp's converter read)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": layers_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
    }


class SafetensorsWriter:
    """A safetensors file whose tensors' dtypes and shapes are known up front, written one tensor at a time
    (in any order) so that a large output is never held in memory whole. Use as a context manager."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = specs
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        self._offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name in sorted(specs):
            dtype, shape = specs[name]
            size = math.prod(shape) * torch.finfo(dtype).bits // 8
            self._offsets[name] = (start, start + size)
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [start, start + size]}
            start += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self._file = open(self.path, "wb")
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._file.truncate(self._data_start + start)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self._file.seek(self._data_start + self._offsets[name][0])
        self._file.write(tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes())
        self._written.add(name)

    def close(self) -> None:
        self._file.close()
        missing = set(self.specs) - self._written
        if missing:
            raise ValueError(f"{self.path}: tensors never written: {', '.join(sorted(missing))}")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()


@checked
def save_adapter(folder: str | Path, config: dict[str, Any], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write a PEFT adapter into `folder`: `factors` maps module name -> (A [r, in], B [out, r]), float tensors of
    shapes that fit together; `config` must be JSON (no NaN or Infinity, which PEFT's reader refuses)."""
    folder = Path(folder)
    try:
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise LoramixError(f"save_adapter(): config is not JSON ({e})") from None
    tensors, storages = {}, set()
    for module, (a, b) in sorted(factors.items()):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or 0 in (*a.shape, *b.shape):
            raise LoramixError(f"save_adapter(): module '{module}': A {list(a.shape)} and B {list(b.shape)} are not "
                               "[r, in] and [out, r]")
        if a.dtype not in _SAFETENSORS_DTYPES or b.dtype not in _SAFETENSORS_DTYPES:
            raise LoramixError(f"save_adapter(): module '{module}': factors must be float32, float16, bfloat16 or "
                               f"float64, got {a.dtype} and {b.dtype}")
        for which, t in (("A", a), ("B", b)):
            t = t.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors that share memory
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[f"{TENSOR_PREFIX}{module}.lora_{which}.weight"] = t
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(text, encoding="utf-8")
    except OSError as e:
        raise LoramixError(f"{e.filename or folder}: {e.strerror or e}") from None
