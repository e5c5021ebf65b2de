"""A bank: a folder whose immediate subfolders are PEFT LoRA adapters for one base model, each with the
data it was trained on (`train.jsonl`) when it is known. Entries without data are signed by their answers to probe
prompts (`probes`)."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from .adapter import LoraAdapter
from .arguments import checked
from .data import Dataset, read_dataset
from .errors import LoramixError, setting
from .files import sha256_file
from .paths import index_dir, resolve_bank

log = logging.getLogger("loramix")

DATA_FILE = "train.jsonl"
# Config fields that must agree across a bank's entries for one composed adapter to express them all.
_SHARED_FIELDS = ("fan_in_fan_out", "layers_to_transform", "layers_pattern")


@dataclass
class BankEntry:
    """One adapter of the bank and its training data file (None when the entry has none)."""

    name: str
    adapter: LoraAdapter
    data_file: Path | None

    @property
    def has_data(self) -> bool:
        return self.data_file is not None

    @cached_property
    def data_hash(self) -> str:
        """sha256 of train.jsonl: the key of this entry's cached signatures."""
        if self.data_file is None:
            raise LoramixError(f"{self.name}: no {DATA_FILE}")
        return sha256_file(self.data_file)

    @property
    def samples(self) -> int | None:
        """Number of records in train.jsonl (its non-blank lines), None when the entry has none."""
        if self.data_file is None:
            return None
        with open(self.data_file, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())

    def dataset(self) -> Dataset:
        if self.data_file is None:
            raise LoramixError(f"{self.name}: no {DATA_FILE}")
        return read_dataset(self.data_file)


class Bank:
    """The adapters of a bank folder, validated together: one base model, one shape per module name.

    `entries` are sorted by name; `usable` are those with training data (signed by it; the others by their answers
    to probe prompts, `BankIndex.weighted`).
    """

    @checked
    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        """`path`: a bank folder, or 'default' for the bank shipped with loramix. `allow_pickle`: also read
        adapter_model.bin files (torch.load with weights_only=True); refused otherwise."""
        self.path = resolve_bank(path)
        self.allow_pickle = allow_pickle
        check_bank_path(self.path)
        if not self.path.is_dir():
            raise LoramixError(f"{self.path}: bank folder not found")
        self.entries: list[BankEntry] = []
        for sub in sorted(p for p in self.path.iterdir() if not skipped(p.name)):
            if not sub.is_dir():
                if sub.is_symlink():  # dangling, or a loop
                    log.warning("%s: a link that leads to no folder, skipped", sub.name)
                continue
            if (why := not_utf8(sub.name)) is not None:
                raise LoramixError(f"{sub.name}: the entry's folder name {unreadable(sub.name, why, 'rename it')}")
            data = sub / DATA_FILE
            if os.path.lexists(data) and not data.is_file():
                raise LoramixError(f"{sub.name}: {DATA_FILE} is not a regular file")
            self.entries.append(BankEntry(sub.name, LoraAdapter(sub, allow_pickle=allow_pickle), data if data.is_file() else None))
        if not self.entries:
            raise LoramixError(f"{self.path}: the bank holds no adapter folders")
        self.base_model, self.shapes = check_entries(self.entries)
        if without := [e.name for e in self.entries if not e.has_data]:
            log.warning(f"%s: no %s (%d of %d entries): signed by their answers to probe prompts ({setting('entry_signatures')}; "
                        "'data' gives them no weight)", ", ".join(without[:3]) + (", ..." if len(without) > 3 else ""),
                        DATA_FILE, len(without), len(self.entries))

    @property
    def usable(self) -> list[BankEntry]:
        return [e for e in self.entries if e.has_data]

    @property
    def index_dir(self) -> Path:
        """BANK/.loramix, or a folder in loramix's cache when the bank folder is read-only (an installed package)."""
        return index_dir(self.path)

    @property
    def max_rank(self) -> int:
        return max(m.rank for e in self.entries for m in e.adapter.modules.values())

    @property
    def dtype(self) -> torch.dtype:
        """The entries' common stored dtype, or float32 when they differ."""
        dtypes = {e.adapter.dtype for e in self.entries}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def config(self) -> dict:
        """An entry's adapter_config.json, for the fields every entry shares."""
        return self.entries[0].adapter.config

    def entry(self, name: str) -> BankEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise LoramixError(f"{self.path}: no entry named '{name}'")


def skipped(name: str) -> bool:
    """Whether a bank's folder `name` is no entry: hidden (.loramix, an editor's .git) or Python's __pycache__."""
    return name.startswith(".") or name == "__pycache__"


def check_bank_path(path: Path) -> None:
    """Refuse, naming the bank path, what is no bank folder whatever it holds: a path that exists and is not a
    folder (a file, a FIFO), and a path that is not UTF-8 text (a byte of a non-UTF-8 name, which Python decodes to a
    lone surrogate: file formats, the index's keys and llama.cpp all need the path as text)."""
    if (why := not_utf8(str(path.absolute()))) is not None:
        raise LoramixError(f"{path}: the bank path {unreadable(str(path.absolute()), why, 'rename the folder')}")
    if os.path.lexists(path) and not path.is_dir():
        raise LoramixError(f"{path}: is {'a file' if path.is_file() else 'not a folder'}, not a bank folder (a bank is a "
                           "folder of adapter folders)")


def not_utf8(text: str) -> str | None:
    """None when `text` (a path) is UTF-8 text, else which byte is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        return f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}"
    return None


def unreadable(text: str, why: str, fix: str) -> str:
    """What is wrong with a path (or name) `text` that is not Unicode text here: bytes that are not UTF-8 (`why`:
    `fix` them), or UTF-8 bytes that Python decoded in another file system encoding (the C / POSIX locale without
    UTF-8 mode: every non-ASCII byte of a name becomes a lone surrogate), which the user's environment fixes."""
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return f"is not UTF-8 text ({why}); {fix}"
    return (f"is UTF-8 text, but this Python reads file names as {sys.getfilesystemencoding()} (a C / POSIX locale): run "
            "loramix with PYTHONUTF8=1 or a UTF-8 locale (LC_ALL=C.UTF-8)")


def has_entries(path: Path) -> bool:
    """Whether the folder `path` holds an entry folder (a visible subfolder with an adapter_config.json) as `Bank`
    reads it: hidden folders (a run's temporary output, the index) are not entries."""
    from .adapter import CONFIG_FILE

    return path.is_dir() and any(not skipped(p.name) and os.path.lexists(p / CONFIG_FILE) for p in path.iterdir())


def check_entries(entries: Sequence[BankEntry]) -> tuple[str | None, dict[str, tuple[int, int]]]:
    """Check that entries can live in one bank: one base model (the most common name; unnamed entries allowed),
    equal shared config fields, one [out, in] shape per module name. Returns (base model, module shapes)."""
    first = entries[0].adapter
    bases = Counter(e.adapter.base_model.rstrip("/") for e in entries if e.adapter.base_model)
    base_model = bases.most_common(1)[0][0] if bases else None
    for e in entries:
        if e.adapter.base_model and e.adapter.base_model.rstrip("/") != base_model:
            raise LoramixError(
                f"{e.name}: adapter_config.json field 'base_model_name_or_path' is {e.adapter.base_model!r}, "
                f"but the bank's other entries have {base_model!r}: a bank holds adapters of one base model"
            )
    for field_name in _SHARED_FIELDS:
        for e in entries:
            if e.adapter.config.get(field_name) != first.config.get(field_name):
                raise LoramixError(
                    f"{e.name}: adapter_config.json field '{field_name}' is {e.adapter.config.get(field_name)!r}, "
                    f"but {entries[0].name} has {first.config.get(field_name)!r}"
                )
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for e in entries:
        for name, m in e.adapter.modules.items():
            shape = (m.out_features, m.in_features)
            if shapes.setdefault(name, shape) != shape:
                raise LoramixError(f"{e.name}: module '{name}' is {list(shape)} ([out, in]) but {owner[name]} has {list(shapes[name])}")
            owner.setdefault(name, e.name)
    return base_model, shapes
