"""Stage 1: datasets. Read a task's input/output pairs from JSONL, JSON, CSV/TSV, a Natural-Instructions
task file or a Hugging Face `save_to_disk` folder into one in-memory form, `Dataset`."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import LoramixError

MAX_RECORD_CHARS = 1_000_000  # a longer input/output pair is a broken file, not a sample


@dataclass(frozen=True)
class Sample:
    """One instance: an input text and one or more reference outputs (the first is the training target)."""

    input: str
    outputs: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.outputs[0]


@dataclass
class Dataset:
    """A task's samples and where they came from. `definition` is the task instruction when the source has one."""

    samples: list[Sample]
    source: str
    definition: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def fingerprint(self) -> str:
        """sha256 (hex) of the samples' content, independent of the file format they were read from."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(json.dumps([s.input, list(s.outputs)], ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()

    def subsample(self, max_samples: int | None, seed: int) -> "Dataset":
        """At most `max_samples` samples, drawn without replacement by a seeded RNG, in their original order."""
        if max_samples is None or len(self.samples) <= max_samples:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.samples), size=max_samples, replace=False))
        return Dataset([self.samples[i] for i in keep], self.source, self.definition, dict(self.metadata))


def _to_sample(record: Any, where: str, input_field: str, output_field: str) -> Sample:
    if not isinstance(record, dict):
        raise LoramixError(f"{where}: expected an object with '{input_field}' and '{output_field}', got {type(record).__name__}")
    for name in (input_field, output_field):
        if name not in record:
            raise LoramixError(f"{where}: missing field '{name}' (fields present: {', '.join(map(str, record)) or 'none'})")
    inp, out = record[input_field], record[output_field]
    if not isinstance(inp, str):
        raise LoramixError(f"{where}: field '{input_field}' must be a string, got {type(inp).__name__}")
    outputs = [out] if isinstance(out, str) else out
    if not isinstance(outputs, (list, tuple)) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise LoramixError(f"{where}: field '{output_field}' must be a string or a non-empty list of strings")
    size = len(inp) + sum(map(len, outputs))
    if size > MAX_RECORD_CHARS:
        raise LoramixError(f"{where}: the record is {size:,} characters long (at most {MAX_RECORD_CHARS:,})")
    return Sample(inp, tuple(outputs))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoramixError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _records_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise LoramixError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def _records_csv(path: Path) -> Iterable[tuple[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(_read_text(path).splitlines(), delimiter=delimiter)
    for rowno, row in enumerate(reader, 2):
        yield f"{path}:{rowno}", row


def _records_hf(path: Path, split: str) -> Iterable[tuple[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise LoramixError(f"{path}: no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


def read_dataset(
    path: str | Path,
    *,
    split: str = "train",
    input_field: str = "input",
    output_field: str = "output",
    with_definition: bool = True,
) -> Dataset:
    """Read a dataset, its format told by the path: `.jsonl`; `.json` (a list of records, or a
    Natural-Instructions task with `Definition` and `Instances`); `.csv` / `.tsv` with input/output columns;
    a folder written by `datasets.save_to_disk` (`split` picks from a DatasetDict). `output` may be a string
    or a list of strings. For a Natural-Instructions task, `with_definition` puts the definition, a blank
    line, then each instance's input, as the model's input."""
    path = Path(path)
    if not path.exists():
        raise LoramixError(f"{path}: dataset not found")
    definition = None
    suffix = path.suffix.lower()
    if path.is_dir():
        if not any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            raise LoramixError(f"{path}: a folder must be a Hugging Face dataset saved with save_to_disk")
        records: Iterable[tuple[str, Any]] = _records_hf(path, split)
    elif suffix == ".jsonl":
        records = _records_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        records = _records_csv(path)
    elif suffix == ".json":
        try:
            doc = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise LoramixError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(doc, dict) and "Instances" in doc:
            definition = doc.get("Definition")
            if isinstance(definition, list):
                definition = "\n".join(definition)
            instances = doc["Instances"]
            if not isinstance(instances, list):
                raise LoramixError(f"{path}: 'Instances' must be a list")
            records = ((f"{path}: Instances[{i}]", r) for i, r in enumerate(instances))
        elif isinstance(doc, list):
            records = ((f"{path}[{i}]", r) for i, r in enumerate(doc))
        else:
            raise LoramixError(f"{path}: expected a list of records or a Natural-Instructions task (Definition, Instances)")
    else:
        raise LoramixError(f"{path}: unknown dataset format '{suffix}'; use .jsonl, .json, .csv, .tsv or a save_to_disk folder")

    samples = [_to_sample(r, where, input_field, output_field) for where, r in records]
    if not samples:
        raise LoramixError(f"{path}: the dataset has no samples")
    if definition and with_definition:
        samples = [Sample(f"{definition}\n\n{s.input}", s.outputs) for s in samples]
    return Dataset(samples, str(path), definition)


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> None:
    """Write samples as JSONL records {"input": str, "output": [str, ...]} (the bank's train.jsonl format)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"input": s.input, "output": list(s.outputs)}, ensure_ascii=False) + "\n")
