"""Reading a PEFT LoRA adapter folder lazily (`LoraAdapter`): its config checked and its modules (`LoraModule`: rank,
scale, shape) resolved on open, each module's tensors read on demand.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arguments import checked
from ..errors import LoramixError
from ..files import PICKLE_FILE, WEIGHTS_FILE
from .config import (_COMPOSED, _METADATA, _PLAIN_INITS, _REFUSED_FIELDS, _UNKNOWN_FIELD, CONFIG_FILE, TENSOR_PREFIX,
                     applied_by_peft, read_config, resolve_targets)
from .patterns import pattern_value, prematch
from .safetensors import _SAFETENSORS_DTYPES, _TORCH_DTYPES, Span, _read_safetensors_header, _safetensors_spans, _scratch

log = logging.getLogger("loramix")

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")  # what PEFT loads


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


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: device, inode, size, modification time (ns)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


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
