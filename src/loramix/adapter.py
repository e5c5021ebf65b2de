"""PEFT LoRA adapters on disk: read one lazily (config checked, tensors read per module on demand) and
write one (`adapter_config.json` + `adapter_model.safetensors`).

PEFT's update for a module is delta_W = scale * B @ A with A: [r, in], B: [out, r] and
scale = alpha / r, or alpha / sqrt(r) with `use_rslora`; r and alpha may be overridden per module by
`rank_pattern` / `alpha_pattern` (regex keys matched against the module name, first match wins). The tensors
composed are those PEFT applies: of the modules that `target_modules`, `exclude_modules` and
`layers_to_transform` select."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

from .arguments import checked
from .errors import LoramixError
from .files import PICKLE_FILE, WEIGHTS_FILE, parse_json
from .peft_config import (_COMPOSED, _METADATA, _PLAIN_INITS, _REFUSED_FIELDS, _UNKNOWN_FIELD, CONFIG_FILE,
                          applied_by_peft, check_config, pattern_value, prematch, resolve_targets)

log = logging.getLogger("loramix")

TENSOR_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")  # what PEFT loads

# The dtypes loramix writes adapters in, by the names options and configs use.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The dtypes it reads (also float64), by their safetensors codes: F32, F16, BF16, F64.
_TORCH_DTYPES = {name.upper().replace("FLOAT", "F"): dtype for name, dtype in {**DTYPES, "float64": torch.float64}.items()}
_SAFETENSORS_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}


# safetensors dtype names -> bytes per element (every dtype the format defines, so any file's layout can be checked).
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8}
_ST_MAX_HEADER = 100_000_000  # safetensors' own bound on the JSON header's length
Span = tuple[int, int, str, list[int]]  # first byte, end byte, safetensors dtype name, shape


def _read_safetensors_header(f: BinaryIO, size: int) -> bytes:
    """The JSON header of an open safetensors file of `size` bytes (after its 8-byte little-endian length); ValueError
    if the file is too short for it."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise ValueError("shorter than its 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > min(_ST_MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} exceeds the file ({size} bytes)" if n <= _ST_MAX_HEADER else
                         f"header length {n} exceeds safetensors' limit")
    return f.read(n)


def _safetensors_spans(header: bytes, size: int) -> dict[str, Span]:
    """Tensor name -> `Span` of its data in a safetensors file of `size` bytes with this JSON `header`, validated as
    safetensors validates a file on open: a JSON object; per tensor a known dtype, a shape of non-negative integers
    and offsets whose length is the shape's bytes; the tensors' data contiguous, without gaps or overlaps, filling the
    file to its end. ValueError naming what is wrong.
    Data is then read with plain file reads, not safetensors' memory map: mapped pages count in the reading
    process's resident memory, so a bank composed through open maps would grow it by the bank's size."""
    try:
        entries = json.loads(header.decode("utf-8"))  # text: a byte-order mark is refused, as safetensors refuses it
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"header is not JSON: {e}") from None
    if not isinstance(entries, dict):
        raise ValueError("header is not a JSON object")
    meta = entries.pop("__metadata__", None)
    meta = {} if meta is None else meta  # null: no metadata, as safetensors reads it
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ is not an object of strings")
    base, spans = 8 + len(header), {}
    for name, t in entries.items():
        ok = isinstance(t, dict) and isinstance(t.get("dtype"), str) and t["dtype"] in _ST_ITEMSIZE
        shape, offsets = (t.get("shape"), t.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1]:
            raise ValueError(f"tensor '{name}': expected a known dtype, a shape and two ordered data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEMSIZE[t["dtype"]]:
            raise ValueError(f"tensor '{name}': its data offsets do not hold {t['dtype']} {shape}")
        spans[name] = (base + offsets[0], base + offsets[1], t["dtype"], shape)
    end = base
    for first, last, _, _ in sorted(spans.values()):
        if first != end:
            raise ValueError("tensor data overlaps or leaves a gap")
        end = last
    if end != size:
        raise ValueError(f"the tensors' data ends at byte {end}, the file at byte {size}")
    return spans


@dataclass(frozen=True)
class _Layout:
    """What a weights file's header and an adapter_config.json say together: the modules PEFT applies, their tensor
    keys (A, B), the spans of the tensors, the stored dtype and the modules that have tensors but are not applied."""

    modules: dict[str, "LoraModule"]
    keys: dict[str, tuple[str, str]]
    spans: dict[str, Span]
    dtype: torch.dtype
    skipped: frozenset[str]


# (config as JSON, weights header, file size) -> _Layout: the adapters of a bank trained with one recipe share their
# header bytes, so each distinct one is parsed and checked once per process.
_LAYOUTS: dict[tuple[str, bytes, int], _Layout] = {}
_MAX_LAYOUTS = 256
_SCRATCH = threading.local()  # per thread: bytes that read_into converts from, reused


def _scratch(slot: int, nbytes: int) -> torch.Tensor:
    """A uint8 buffer of `nbytes` owned by this thread (slot 0 or 1), grown when too small: reused, so a read of
    many small tensors does not fault fresh memory in for each."""
    buffers = _SCRATCH.__dict__.get("buffers")
    if buffers is None:
        buffers = _SCRATCH.buffers = [torch.empty(0, dtype=torch.uint8)] * 2
    if buffers[slot].numel() < nbytes:
        buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
    return buffers[slot][:nbytes]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: device, inode, size, modification time (ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


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


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear module: A is [rank, in_features], B is [out_features, rank]; delta_W = scale * B @ A."""

    name: str
    rank: int
    scale: float
    in_features: int
    out_features: int


class LoraAdapter:
    """A PEFT LoRA adapter folder, validated on open; tensor data is read per module by `factors`."""

    @checked
    def __init__(self, path: str | Path, name: str | None = None, *, allow_pickle: bool = False):
        """`allow_pickle`: also read an adapter_model.bin, with torch.load(weights_only=True); refused otherwise."""
        self.path = Path(path)
        self.name = name or self.path.name
        self.allow_pickle = allow_pickle
        self.config, self.base_modules = resolve_targets(self._read_config(), self.name)
        self.base_model: str | None = self.config.get("base_model_name_or_path")
        self._identity: tuple[int, int, int, int] | None = None  # of the weights file whose header was read
        self._pickled: dict[str, torch.Tensor] | None = None
        layout = self._read_layout()
        if layout.skipped:
            log.warning("%s: %d module(s) have tensors but are not selected by %s's target_modules / exclude_modules / "
                        "layers_to_transform, so PEFT does not apply them and neither does loramix (e.g. %s)",
                        self.name, len(layout.skipped), CONFIG_FILE, sorted(layout.skipped)[0])
        self.modules: dict[str, LoraModule] = dict(layout.modules)
        self.dtype: torch.dtype = layout.dtype
        self._spans, self._tensor_keys = layout.spans, layout.keys  # shared between adapters of one layout: read-only

    # -- validation -------------------------------------------------------------------------------------
    def _fail(self, what: str) -> LoramixError:
        return LoramixError(f"{self.name}: {what}")

    def _read_config(self) -> dict[str, Any]:
        config = read_config(self.path, self.name)
        if config.get("peft_type", "LORA") != "LORA":
            raise self._fail(f"{CONFIG_FILE}: peft_type is {config.get('peft_type')!r}, only LORA adapters are composed")
        for field_name, value in config.items():
            if value and field_name not in _COMPOSED and field_name not in _METADATA:
                raise self._fail(f"{CONFIG_FILE}: field '{field_name}' is set: {_REFUSED_FIELDS.get(field_name, _UNKNOWN_FIELD)}")
        if config.get("bias", "none") != "none":
            raise self._fail(f"{CONFIG_FILE}: field 'bias' is {config['bias']!r}: bias training is not composed, only 'none'")
        if config.get("init_lora_weights") is not None and config["init_lora_weights"] not in _PLAIN_INITS:  # null: no init
            raise self._fail(f"{CONFIG_FILE}: field 'init_lora_weights' is {config['init_lora_weights']!r}: only adapters "
                             f"over unchanged base weights are composed ({', '.join(map(str, _PLAIN_INITS))}); convert it to a plain LoRA first")
        for field_name in ("r", "lora_alpha"):
            if config.get(field_name) is None:
                raise self._fail(f"{CONFIG_FILE}: field '{field_name}' is missing")
        return config

    def _read_layout(self) -> _Layout:
        """The layout of the weights file (safetensors: its header, read once and validated; a pickle only with
        allow_pickle, loaded with torch.load(weights_only=True)) under this adapter's config."""
        file = self.path / WEIGHTS_FILE
        if file.is_file():
            with open(file, "rb") as f:
                st = os.fstat(f.fileno())
                self._identity = _identity(st)
                try:
                    header = _read_safetensors_header(f, st.st_size)
                except ValueError as e:
                    raise self._fail(f"{WEIGHTS_FILE}: unreadable safetensors file ({e})") from None
                self._check_unchanged(os.fstat(f.fileno()))  # the header read is that version's
            # the config as written, not sorted: rank_pattern / alpha_pattern keys are tried in their order (the
            # first that matches wins), so two configs that differ only in that order are two layouts
            key = (json.dumps(self.config), header, st.st_size)
            if key not in _LAYOUTS:
                try:
                    spans = _safetensors_spans(header, st.st_size)
                except ValueError as e:
                    raise self._fail(f"{WEIGHTS_FILE}: unreadable safetensors file ({e})") from None
                if len(_LAYOUTS) >= _MAX_LAYOUTS:
                    _LAYOUTS.clear()
                _LAYOUTS[key] = self._layout(WEIGHTS_FILE, {k: (shape, dtype) for k, (_, _, dtype, shape) in spans.items()}, spans)
            return _LAYOUTS[key]
        if os.path.lexists(file):  # a folder, a FIFO, a device, a dangling link
            raise self._fail(f"{WEIGHTS_FILE} is not a regular file")
        pickled = self.path / PICKLE_FILE
        if not pickled.is_file():
            raise self._fail(f"no {WEIGHTS_FILE} in {self.path}")
        if not self.allow_pickle:
            raise self._fail(f"{PICKLE_FILE} is a pickle and is not loaded by default (--allow-pickle loads it with weights_only=True)")
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise self._fail(f"{PICKLE_FILE}: not loadable as plain tensors ({str(e).splitlines()[0]})") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise self._fail(f"{PICKLE_FILE}: expected a dict of tensors")
        self._pickled = tensors
        return self._layout(PICKLE_FILE, {k: (list(t.shape), _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)))
                                          for k, t in tensors.items()}, {})

    def _layout(self, source: str, tensors: dict[str, tuple[list[int], str]], spans: dict[str, Span]) -> _Layout:
        """Check the tensors (name -> (shape, safetensors dtype name)) of `source` against the config: LoRA A/B
        weights of linear modules, both per module, ranks as the config says, one supported dtype."""
        shapes: dict[str, dict[str, list[int]]] = {}
        keys: dict[str, dict[str, str]] = {}
        dtypes = set()
        skipped, selected = set(), {}
        prematch(self.config, sorted({m["module"] for k in tensors if (m := _KEY.match(k))}))
        for key, (shape, dtype_name) in sorted(tensors.items()):
            m = _KEY.match(key)
            if not m and _KEY.match(TENSOR_PREFIX + key):
                raise self._fail(f"{source}: tensor '{key}' lacks the '{TENSOR_PREFIX}' prefix, so PEFT does not load it "
                                 f"(the module keeps a zero update); add the prefix to every tensor name")
            if not m:
                raise self._fail(f"{source}: tensor '{key}' is not a LoRA A/B weight of a linear module")
            module, which = m["module"], m["which"]
            if module not in selected:
                # PEFT ignores tensors of modules its base does not have, and lora_A / lora_B weights of a module
                # whose LoRA layer has other tensors (an embedding's are lora_embedding_A / _B)
                base = self.base_modules
                selected[module] = (applied_by_peft(self.config, module, self.name, base.output_layer if base else "lm_head")
                                    and (base is None or base.kinds.get(module) == "linear"))
            if not selected[module]:
                skipped.add(module)
                continue
            shapes.setdefault(module, {})[which] = shape
            keys.setdefault(module, {})[which] = key
            dtypes.add(dtype_name)
        if not shapes:
            raise self._fail(f"{source}: no LoRA tensors" + (f" of the modules {CONFIG_FILE} selects" if skipped else ""))
        if not dtypes <= _TORCH_DTYPES.keys():
            raise self._fail(f"{source}: unsupported tensor dtype(s) {sorted(dtypes - _TORCH_DTYPES.keys())}")
        cfg = self.config
        modules = {}
        for name, ab in sorted(shapes.items()):
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise self._fail(f"{source}: module '{name}' has no {missing} tensor")
            a, b = ab["A"], ab["B"]
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise self._fail(f"{source}: module '{name}': lora_A {a} and lora_B {b} are not [r, in] and [out, r]")
            rank = a[0]
            # against the base the config names (none named: the base is not known, whatever base_modules assumes)
            named = self.base_modules is not None and cfg.get("base_model_name_or_path") is not None
            base_shape = self.base_modules.shapes.get(name) if named else None
            if base_shape is not None and (b[0], a[1]) != base_shape:  # PEFT refuses it (size mismatch)
                raise self._fail(f"module '{name}' is [{b[0]}, {a[1]}] ([out, in]) but base model {self.base_model!r} "
                                 f"has {list(base_shape)}")
            if rank == 0:
                raise self._fail(f"{source}: module '{name}' has rank 0")
            cfg_rank = pattern_value(cfg.get("rank_pattern"), name, cfg["r"], f"{self.name}: {CONFIG_FILE}: field 'rank_pattern'")
            if cfg_rank != rank:
                raise self._fail(f"{CONFIG_FILE}: rank {cfg_rank} for module '{name}' disagrees with its tensors (rank {rank})")
            alpha = pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"], f"{self.name}: {CONFIG_FILE}: field 'alpha_pattern'")
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            modules[name] = LoraModule(name, rank, float(scale), a[1], b[0])
        base = self.base_modules
        # false, or null (set: PEFT then skips initialising): PEFT leaves the A and B of a layer without tensors random
        bare_init = "init_lora_weights" in cfg and cfg["init_lora_weights"] in (False, None)
        if bare_init and base is not None:
            bare = sorted(n for n, kind in base.kinds.items() if kind is not None and n not in shapes
                          and applied_by_peft(cfg, n, self.name, base.output_layer))
            if bare:
                raise self._fail(f"{CONFIG_FILE}: field 'init_lora_weights' is {json.dumps(cfg['init_lora_weights'])} and module "
                                 f"'{bare[0]}', which PEFT puts a LoRA layer on, has no tensors: PEFT gives it a random "
                                 f"update; set init_lora_weights to true (its update is then zero) or leave the module out "
                                 f"of target_modules")
        # one stored dtype is kept; a mix is read as float32 (float64 if any tensor is float64)
        stored = _TORCH_DTYPES[dtypes.pop()] if len(dtypes) == 1 else (torch.float64 if "F64" in dtypes else torch.float32)
        return _Layout(modules, {n: (keys[n]["A"], keys[n]["B"]) for n in modules}, spans, stored, frozenset(skipped))

    # -- tensor access ----------------------------------------------------------------------------------
    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of one module, as stored (dtype unchanged), read from disk now."""
        key_a, key_b = self._tensor_keys[module]
        if self._pickled is not None:  # copies: a caller changing them in place must not change later reads
            return self._pickled[key_a].clone(), self._pickled[key_b].clone()
        a, b = (torch.empty(self._spans[k][3], dtype=_TORCH_DTYPES[self._spans[k][2]]) for k in (key_a, key_b))
        self.read_into(module, a, b)
        return a, b

    def read_into(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Read one module's A into `a` [r, in] and B into `b` [out, r], converted to their dtypes. A contiguous
        destination of the stored dtype is read into directly, any other through a reused per-thread buffer; both
        tensors in one read when they lie side by side in the file (the usual layout)."""
        m = self.modules[module]
        if (tuple(a.shape), tuple(b.shape)) != ((m.rank, m.in_features), (m.out_features, m.rank)):
            raise ValueError(f"module '{module}' is A [{m.rank}, {m.in_features}], B [{m.out_features}, {m.rank}]; "
                             f"the destinations {list(a.shape)} and {list(b.shape)}")
        key_a, key_b = self._tensor_keys[module]
        if self._pickled is not None:
            a.copy_(self._pickled[key_a])
            b.copy_(self._pickled[key_b])
            return
        reads = []  # (first byte, end byte, bytes to read into, (destination, stored view) to convert or None)
        for slot, (key, out) in enumerate(((key_a, a), (key_b, b))):
            start, end, dtype_name, shape = self._spans[key]
            dtype = _TORCH_DTYPES[dtype_name]
            if out.dtype == dtype and out.is_contiguous():
                reads.append((start, end, out.view(-1).view(torch.uint8).numpy(), None))
            else:
                raw = _scratch(slot, end - start)
                reads.append((start, end, raw.numpy(), (out, raw.view(dtype).view(shape))))
        if reads[1][0] < reads[0][0]:
            reads.reverse()
        fd = os.open(os.path.join(self.path, WEIGHTS_FILE), os.O_RDONLY)  # plain calls: one entry's are many here
        try:
            self._check_unchanged(os.fstat(fd))
            (start, end, first, _), (start2, end2, second, _) = reads
            if end == start2:  # side by side (the usual layout): one read
                ok = os.preadv(fd, [first, second], start) == end2 - start
            else:
                ok = os.preadv(fd, [first], start) == end - start and os.preadv(fd, [second], start2) == end2 - start2
            if not ok:
                raise self._fail(f"{WEIGHTS_FILE}: tensor data of module '{module}' unreadable (the file is shorter than its header says)")
        finally:
            os.close(fd)
        for *_, convert in reads:
            if convert is not None:
                convert[0].copy_(convert[1])

    def _check_unchanged(self, st: os.stat_result) -> None:
        """Refuse a weights file that is no longer the one whose header was read (replaced or rewritten since, e.g.
        by `bank add --force`): its tensors would mix two adapters."""
        if _identity(st) != self._identity:
            raise self._fail(f"{WEIGHTS_FILE} changed while loramix was reading it (replaced by another run?): run again")

    def delta(self, module: str) -> torch.Tensor:
        """The dense update scale * B @ A of one module, float64 [out, in] (for tests and small models)."""
        a, b = self.factors(module)
        return self.modules[module].scale * (b.double() @ a.double())

    @property
    def target_modules(self) -> list[str]:
        """The modules' last name components (e.g. q_proj), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})


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
