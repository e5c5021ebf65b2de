"""Stage 1: datasets. Read a task's input/output pairs from JSONL, JSON, CSV/TSV, a Natural-Instructions
task file or a Hugging Face `save_to_disk` folder into one in-memory form, `Dataset`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator

import numpy as np

from .arguments import Range, check_seed, checked
from .errors import LoramixError
from .files import naming, parse_json, read_json

MAX_RECORD_CHARS = 1_000_000  # a longer input/output pair is a broken file, not a sample


@dataclass(frozen=True)
class Sample:
    """One instance: an input text and one or more reference outputs (the first is the training target)."""

    input: str
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        """Refuse what no file could hold or no tokenizer read: non-strings, no outputs, more than MAX_RECORD_CHARS
        characters, lone surrogates (text that is not Unicode)."""
        if not isinstance(self.input, str):
            raise LoramixError(f"the input must be a string, got {type(self.input).__name__}")
        if not isinstance(self.outputs, tuple) or not self.outputs or not all(isinstance(o, str) for o in self.outputs):
            raise LoramixError("the output must be a string or a non-empty list of strings")
        size = len(self.input) + sum(map(len, self.outputs))
        if size > MAX_RECORD_CHARS:
            raise LoramixError(f"the record is {size:,} characters long (at most {MAX_RECORD_CHARS:,})")
        for text in (self.input, *self.outputs):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise LoramixError(f"the text holds a lone surrogate (U+{ord(text[e.start]):04X}), which is not Unicode text") from None

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

    def __post_init__(self) -> None:
        """Refuse what no reader makes: samples that are not a list of Sample, a source that is not a string."""
        if isinstance(self.samples, tuple):
            self.samples = list(self.samples)
        if not isinstance(self.samples, list) or not all(isinstance(s, Sample) for s in self.samples):
            raise LoramixError(f"Dataset: samples must be a list of Sample(input, outputs), got {type(self.samples).__name__}"
                               + (f" holding {type(next(s for s in self.samples if not isinstance(s, Sample))).__name__}"
                                  if isinstance(self.samples, list) else ""))
        if not isinstance(self.source, str):
            raise LoramixError(f"Dataset: source must be a string, got {type(self.source).__name__}")
        if self.definition is not None and not isinstance(self.definition, str):
            raise LoramixError(f"Dataset: definition must be a string or None, got {type(self.definition).__name__}")

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

    @checked
    def subsample(self, max_samples: Annotated[int, Range(0, None)] | None, seed: int) -> "Dataset":
        """At most `max_samples` samples, drawn without replacement by a seeded RNG, in their original order."""
        check_seed("Dataset.subsample(): ", seed)
        if max_samples is None or len(self.samples) <= max_samples:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.samples), size=max_samples, replace=False))
        return Dataset([self.samples[i] for i in keep], self.source, self.definition, dict(self.metadata))


def to_sample(record: Any, where: str, input_field: str = "input", output_field: str = "output") -> Sample:
    """A Sample from one record (an object with `input_field`: str and `output_field`: str or list of str); errors
    name `where` (file and line or index) and the field."""
    if not isinstance(record, dict):
        raise LoramixError(f"{where}: expected an object with '{input_field}' and '{output_field}', got {type(record).__name__}")
    for name in (input_field, output_field):
        if name not in record:
            raise LoramixError(f"{where}: missing field '{name}' (fields present: {', '.join(map(repr, record)) or 'none'})")
    inp, out = record[input_field], record[output_field]
    if not isinstance(inp, str):
        raise LoramixError(f"{where}: field '{input_field}' must be a string, got {type(inp).__name__}")
    outputs = [out] if isinstance(out, str) else out
    if not isinstance(outputs, (list, tuple)) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise LoramixError(f"{where}: field '{output_field}' must be a string or a non-empty list of strings")
    try:
        return Sample(inp, tuple(outputs))
    except LoramixError as e:
        raise LoramixError(f"{where}: {e}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # as stored (a quoted CSV field keeps "\r\n"), less a BOM
    except UnicodeDecodeError as e:
        raise LoramixError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _records_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    # JSON Lines ends records at "\n" only: U+2028 and other Unicode line breaks may stand unescaped in a string
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            yield f"{path}:{lineno}", parse_json(line, f"{path}:{lineno}")


def _records_csv(path: Path) -> Iterable[tuple[str, Any]]:
    """Rows of a CSV/TSV file with a header row, quoted fields may span lines (as csv.writer writes them). Parsed
    strictly: a quote that is never closed, or text after a field's closing quote (`"5" screen`), is refused with
    the line where its record starts, never read by guessing (dropped quotes, lines merged into one record)."""
    kind = path.suffix.lower()[1:].upper()
    delimiter = "\t" if kind == "TSV" else ","
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_CHARS + 1))  # longer fields are refused as records
    text = _read_text(path)
    if not text.strip():
        raise LoramixError(f"{path}: the dataset has no samples (the file is empty)")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    start = 1
    try:
        while True:
            start = reader.line_num + 1  # the line the next record starts on
            try:
                row = next(reader)
            except StopIteration:
                break
            if not row:  # a blank line
                continue
            if header is None:
                header = row
                if len(set(header)) != len(header):
                    raise LoramixError(f"{path}:{start}: the header names a column twice "
                                       f"({', '.join(sorted({h for h in header if header.count(h) > 1}))})")
                continue
            if len(row) != len(header):
                many = "more" if len(row) > len(header) else "fewer"
                raise LoramixError(f"{path}:{start}: the row has {many} fields than the header's {len(header)}"
                                   + (" (an unquoted delimiter in a field?)" if many == "more" else ""))
            yield f"{path}:{start}", dict(zip(header, row))
    except csv.Error as e:
        why = str(e)
        if "unexpected end of data" in why:
            why = "a quoted field is never closed: an unmatched '\"'"
        elif "expected after" in why:
            why = f"{why}: text follows a closing quote (quote a field whole, doubling the quotes inside it)"
        raise LoramixError(f"{path}:{start}: not valid {kind} ({why})") from None


def _inside(folder: Path, name: Any, what: str) -> Path:
    """`folder / name` for a file name a save_to_disk JSON file lists, refused unless it is a plain relative name
    that stays inside `folder` (no absolute path, no '..', no link leading out) and names a regular file."""
    if not isinstance(name, str) or not name:
        raise LoramixError(f"{folder}: {what} must name a file in the folder, got {name!r}")
    target = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not target.resolve().is_relative_to(folder.resolve()):
        raise LoramixError(f"{folder}: {what} '{name}' leads outside the dataset folder; a save_to_disk folder reads "
                           "only its own files")
    return target


def _checked_split(folder: Path) -> int:
    """Check a save_to_disk Dataset folder's state.json before `datasets` opens anything it names: each data file
    inside the folder, a regular file. Returns the number of data files (0: the dataset has no rows)."""
    if not (folder / "state.json").is_file():
        raise LoramixError(f"{folder}: not a readable save_to_disk folder (no state.json)")
    state = read_json(folder / "state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list):
        raise LoramixError(f"{folder / 'state.json'}: field '_data_files' must be a list of {{\"filename\": ...}}")
    for f in files:
        target = _inside(folder, f.get("filename") if isinstance(f, dict) else f, "state.json's data file")
        if not target.is_file():
            raise LoramixError(f"{folder}: state.json's data file '{target.name}' is missing or not a regular file")
    if not (folder / "dataset_info.json").is_file():
        raise LoramixError(f"{folder}: not a readable save_to_disk folder (no dataset_info.json)")
    return len(files)


def _records_hf(path: Path, split: str) -> Iterable[tuple[str, Any]]:
    """The rows of a save_to_disk folder (a Dataset, or `split` of a DatasetDict). Its JSON files are checked first:
    a data file or split named outside the folder is refused, never opened."""
    import datasets

    folder = path
    if not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        if not (path / "dataset_dict.json").is_file():
            raise LoramixError(f"{path}: not a readable save_to_disk folder (no state.json, dataset_info.json or "
                               "dataset_dict.json)")
        doc = read_json(path / "dataset_dict.json", str(path / "dataset_dict.json"))
        splits = doc.get("splits") if isinstance(doc, dict) else None
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise LoramixError(f"{path / 'dataset_dict.json'}: field 'splits' must be a list of names")
        if split not in splits:
            raise LoramixError(f"{path}: no split '{split}' (splits: {', '.join(splits)})")
        folder = _inside(path, split, "dataset_dict.json's split")
        if not folder.is_dir():
            raise LoramixError(f"{path}: split '{split}' has no folder")
    if _checked_split(folder) == 0:
        return
    damaged = (ValueError, OSError, KeyError, TypeError, IndexError, AttributeError, RuntimeError)  # what datasets
    try:  # and pyarrow raise on a damaged state.json (a number where a string belongs: AttributeError) or arrow file
        ds = datasets.Dataset.load_from_disk(str(folder))
        rows = list(ds)
    except damaged as e:
        raise LoramixError(f"{path}: not a readable save_to_disk folder ({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


@checked
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
    if not (path.is_file() or path.is_dir()):  # a FIFO, a device: reading it could block forever
        raise LoramixError(f"{path}: not a regular file or a folder")
    if path.is_file() and path.stat().st_size == 0:
        raise LoramixError(f"{path}: the dataset has no samples (the file is empty)")
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
        doc = parse_json(_read_text(path), str(path))
        if isinstance(doc, dict) and "Instances" in doc:
            definition = doc.get("Definition")
            if isinstance(definition, list) and all(isinstance(d, str) for d in definition):
                definition = "\n".join(definition)
            if definition is not None and not isinstance(definition, str):
                raise LoramixError(f"{path}: 'Definition' must be a string or a list of strings")
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

    samples = [to_sample(r, where, input_field, output_field) for where, r in records]
    if not samples:
        raise LoramixError(f"{path}: the dataset has no samples")
    if definition and with_definition:
        try:
            samples = [Sample(f"{definition}\n\n{s.input}", s.outputs) for s in samples]
        except LoramixError as e:
            raise LoramixError(f"{path}: 'Definition' and an input: {e}") from None
    return Dataset(samples, str(path), definition)


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> None:
    """Write samples as JSONL records {"input": str, "output": [str, ...]} (the bank's train.jsonl format)."""
    with naming(path), open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"input": s.input, "output": list(s.outputs)}, ensure_ascii=False) + "\n")
