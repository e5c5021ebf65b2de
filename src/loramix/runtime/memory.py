"""Memory decided before loading: what a base model will take (bytes) on each runtime, against what this machine (or
its cgroup) has available. A base that does not fit is refused in one line, never a load started that cannot end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import LoramixError

GIB = 2**30
# beside the weights: activations, the KV cache, the tokenizer and Python's own (measured on the default base: ~0.4 GB)
OVERHEAD = 0.5 * GIB


def available_bytes() -> int:
    """Memory this process can still take: /proc/meminfo's MemAvailable, capped by a cgroup v2 memory.max less its
    memory.current; os.sysconf's physical memory where /proc is absent."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def parameter_count(config: Any) -> int:
    """The parameters of the causal LM `config` describes, counted on a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import quiet_loading

    try:
        with torch.device("meta"), quiet_loading():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise LoramixError(f"cannot build the base model from its config: {str(e).splitlines()[0][:200]}") from None
    return sum(p.numel() for p in model.parameters())


def torch_bytes(config: Any, dtype_bytes: int = 4, extra: int = 0) -> int:
    """Bytes a base of `config` takes on PyTorch: its parameters at `dtype_bytes` each (4: float32, 2: bfloat16),
    plus OVERHEAD, plus `extra` (a GGUF's file size: transformers maps the file while it converts its tensors; the
    synthetic 7B Q4_0 base peaked at 18.0 GiB in bfloat16 = 13.5 of parameters + 3.9 of file + 0.6)."""
    return parameter_count(config) * dtype_bytes + int(OVERHEAD) + extra


def gguf_bytes(path: str | Path) -> int:
    """Bytes a GGUF base takes on llama.cpp loaded without mmap: the file's size (its weights as stored) plus
    OVERHEAD."""
    return Path(path).stat().st_size + int(OVERHEAD)


def check_fits(need: int, what: str, advice: str = "") -> None:
    """Refuse, in one line naming `what`, a load of `need` bytes that exceeds the memory available now."""
    have = available_bytes()
    if need > have:
        raise LoramixError(f"{what} needs about {need / GIB:.1f} GB of memory and {have / GIB:.1f} GB is available"
                           + (f": {advice}" if advice else ""))


def bf16_native(device: Any = "cpu") -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX (oneDNN's
    test). Elsewhere bf16 is emulated: on an AVX2-only CPU (AMD Zen 3) a LoRA step under bf16 autocast took 15x as
    long as in float32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def torch_dtype(config: Any, what: str, advice: str = "", extra: int = 0) -> Any:
    """The dtype a base of `config` is loaded in on PyTorch: float32 when it fits in the memory available now (exact
    and cheap for small bases), else bfloat16 where the CPU runs it natively and it fits (half the memory), else a
    one-line refusal naming `what`, both estimates (torch_bytes, with `extra`) and `advice`."""
    import torch

    params, have = parameter_count(config), available_bytes()
    need = {n: params * n + int(OVERHEAD) + extra for n in (4, 2)}
    if need[4] <= have:
        return torch.float32
    if bf16_native() and need[2] <= have:
        return torch.bfloat16
    half = f", {need[2] / GIB:.1f} GB in bfloat16" if bf16_native() else " (bfloat16 would be emulated on this CPU)"
    raise LoramixError(f"{what} ({params / 1e9:.2f}B parameters) needs about {need[4] / GIB:.1f} GB of memory in "
                       f"float32{half}, and {have / GIB:.1f} GB is available" + (f": {advice}" if advice else ""))
