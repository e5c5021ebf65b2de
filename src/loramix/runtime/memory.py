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

    from ..models import quiet_loading

    try:
        with torch.device("meta"), quiet_loading():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise LoramixError(f"cannot build the base model from its config: {str(e).splitlines()[0][:200]}") from None
    return sum(p.numel() for p in model.parameters())


def torch_bytes(config: Any, dtype_bytes: int = 4) -> int:
    """Bytes a base of `config` takes on PyTorch: its parameters at `dtype_bytes` each (4: float32, 2: bfloat16),
    plus OVERHEAD."""
    return parameter_count(config) * dtype_bytes + int(OVERHEAD)


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
