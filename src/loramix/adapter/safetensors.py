"""Reading safetensors files, bounded: the JSON header (`_read_safetensors_header`), the spans of the tensors' data,
validated as safetensors validates a file (`_safetensors_spans`), the dtype tables (loramix's dtype names, safetensors'
codes, item sizes) and the per-thread scratch buffers tensors are read through. Reading only: writing is writer.py's."""

from __future__ import annotations

import json
import math
import threading
from typing import BinaryIO

import torch

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
