"""Banks from the Hugging Face hub: the Lots-of-LoRAs collection (the paper's bank: one Mistral-7B-Instruct-v0.2
LoRA per Super-Natural-Instructions task, each with its dataset), and any local or hub adapter added to a bank.

Downloads go through huggingface_hub (snapshot_download), so HF_HUB_OFFLINE=1 serves them from the local cache.
Every entry records what it was made from, with the pinned revisions, in `source.json`."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from .adapter import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter
from .bank import DATA_FILE, Bank, BankEntry, check_entries
from .data import Sample, read_dataset, to_sample, write_jsonl
from .errors import LoramixError
from .files import atomic_dir
from .progress import track
from .registry import Registry

log = logging.getLogger("loramix")

LOTS_OF_LORAS = "Lots-of-LoRAs"
ADAPTER_REPO = LOTS_OF_LORAS + "/Mistral-7B-Instruct-v0.2-4b-r16-{task}"
SOURCE_FILE = "source.json"
_TASK = re.compile(r"^(task\d+)_[A-Za-z0-9_.-]+$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# `loramix bank pull` collections: name -> fn(out, *, limit=None, tasks=None) -> {entry: 'pulled' or 'kept'}
COLLECTIONS: Registry = Registry("collection")


def safe_entry_name(name: str) -> str:
    """`name` if it is a plain folder name (letters, digits, '_', '.', '-'); never a path that leaves the bank."""
    if not _SAFE_NAME.match(name) or name in (".", "..") or ".." in name:
        raise LoramixError(f"{name!r} is not a valid bank entry name (ASCII letters, digits, '_', '.', '-', at most 128; no path)")
    return name


def _snapshot(repo_id: str, repo_type: str = "model", allow: Sequence[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=list(allow) if allow else None))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:  # ValueError: an invalid repo id
        raise LoramixError(f"{repo_id}: cannot download ({str(e).splitlines()[0]})") from None


def lots_of_loras_datasets() -> dict[str, str]:
    """Task id (e.g. 'task081') -> dataset repo id of the Lots-of-LoRAs collection: listed on the hub, or, with
    HF_HUB_OFFLINE=1, from the datasets of that collection in the local hub cache."""
    from huggingface_hub import HfApi, constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound, HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        try:
            ids = [r.repo_id for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == "dataset"]
        except CacheNotFound:  # no hub cache folder at all: nothing cached
            ids = []
    else:
        try:
            ids = [d.id for d in HfApi().list_datasets(author=LOTS_OF_LORAS)]
        except (HfHubHTTPError, OSError) as e:
            raise LoramixError(f"cannot list the {LOTS_OF_LORAS} datasets on the hub ({str(e).splitlines()[0]})") from None
    out = {}
    for repo_id in ids:
        owner, _, name = repo_id.partition("/")
        m = _TASK.match(name)
        if owner == LOTS_OF_LORAS and m:
            out[m.group(1)] = repo_id
    return dict(sorted(out.items(), key=lambda kv: int(kv[0][4:])))


def _train_samples(snapshot: Path, what: str) -> list[Sample]:
    """The train split of a downloaded dataset repo (parquet, JSONL or JSON files named after the split), each
    record validated as `generate` reads it (`to_sample`)."""
    files = sorted(p for p in snapshot.rglob("*") if p.is_file() and "train" in p.name and p.suffix in (".parquet", ".jsonl", ".json"))
    if not files:
        raise LoramixError(f"{snapshot}: no train split (parquet, JSONL or JSON file named 'train')")
    samples: list[Sample] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(f).to_pylist()
            samples += [to_sample(r, f"{what}: {f.name}[{i}]") for i, r in enumerate(rows)]
        else:
            samples += read_dataset(f).samples
    return samples


@contextlib.contextmanager
def _no_empty_folder(folder: Path):
    """Remove `folder` after a failure if the block created it and left it empty."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _write_entry(dest: Path, adapter_dir: Path, data_samples, source: dict[str, Any], *, force: bool) -> None:
    """An entry folder, written atomically: the adapter's two files, train.jsonl and source.json."""
    LoraAdapter(adapter_dir, name=dest.name)  # refuse what cannot be composed before anything is written
    with atomic_dir(dest, force=force) as tmp:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(adapter_dir / name, tmp / name)
        write_jsonl(data_samples, tmp / DATA_FILE)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


@COLLECTIONS.register("lots-of-loras")
def pull_lots_of_loras(out: str | Path, *, limit: int | None = None, tasks: Sequence[str] | None = None) -> dict[str, str]:
    """Download Lots-of-LoRAs adapters and their datasets' train splits into the bank OUT, one entry per task,
    named like the dataset (`task081_<slug>`). Resumable: entries already there are kept. Returns entry -> status."""
    available = lots_of_loras_datasets()
    if tasks:
        by_number = {int(t[4:]): t for t in available}  # 'task081', '81' and '081' name one task
        wanted, missing = [], []
        for t in tasks:
            number = t[4:] if t.startswith("task") else t
            found = by_number.get(int(number)) if number.isdigit() else None
            (wanted if found else missing).append(found or (t if t.startswith("task") else f"task{t}"))
        if missing:
            raise LoramixError(f"no Lots-of-LoRAs dataset for {', '.join(missing)}")
    else:
        wanted = list(available)
    wanted = wanted[:limit] if limit else wanted
    if not wanted:
        raise LoramixError("no Lots-of-LoRAs dataset found (offline: none in the local hub cache)")
    out = Path(out)
    status = {}
    with _no_empty_folder(out):
        for task in track(wanted, "pulling Lots-of-LoRAs", total=len(wanted)):
            dataset_repo = available[task]
            name = safe_entry_name(dataset_repo.split("/", 1)[1])
            if (out / name / SOURCE_FILE).is_file():
                status[name] = "kept"
                continue
            adapter_repo = ADAPTER_REPO.format(task=task)
            try:
                adapter_dir = _snapshot(adapter_repo, allow=[CONFIG_FILE, WEIGHTS_FILE])
                data_dir = _snapshot(dataset_repo, repo_type="dataset")
                samples = _train_samples(data_dir, dataset_repo)
                source = {"adapter": adapter_repo, "adapter_revision": adapter_dir.name,
                          "dataset": dataset_repo, "dataset_revision": data_dir.name, "split": "train"}
                _write_entry(out / name, adapter_dir, samples, source, force=False)
            except LoramixError as e:  # one task's bad adapter or data leaves the others to pull
                log.warning("refused %s: %s", name, e)
                status[name] = f"refused: {e}"
                continue
            status[name] = "pulled"
        if all(v.startswith("refused") for v in status.values()):
            raise LoramixError(f"{out}: every task was refused ({'; '.join(status.values())})")
        Bank(out)  # the result must be a valid bank
    return status


def add_adapter(bank: str | Path, source: str, data: str | Path, *, name: str | None = None, force: bool = False) -> Path:
    """Add an adapter (a local folder or a hub model id) with its training data (any format loramix reads) to a
    bank, as BANK/<name>/. The bank must stay valid (same base model, compatible shapes), else nothing is kept."""
    bank = Path(bank)
    with _no_empty_folder(bank):
        return _add_adapter(bank, source, data, name=name, force=force)


def _add_adapter(bank: Path, source: str, data: str | Path, *, name: str | None, force: bool) -> Path:
    local = Path(source)
    adapter_dir = local if local.is_dir() else _snapshot(source, allow=[CONFIG_FILE, WEIGHTS_FILE])
    entry = safe_entry_name(name or (local.name if local.is_dir() else source.rsplit("/", 1)[-1]))
    if (bank / entry).exists() and not force:
        raise LoramixError(f"{bank / entry}: the bank already has an entry '{entry}' (use --force to replace it)")
    dataset = read_dataset(data)
    new = BankEntry(entry, LoraAdapter(adapter_dir, name=entry), None)
    others = [e for e in Bank(bank).entries if e.name != entry] if any(bank.glob(f"*/{CONFIG_FILE}")) else []
    check_entries(others + [new])  # before anything is written
    record = {"adapter": str(local.resolve()) if local.is_dir() else source, "data": str(data)}
    if not local.is_dir():
        record["adapter_revision"] = adapter_dir.name
    _write_entry(bank / entry, adapter_dir, dataset.samples, record, force=force)
    return bank / entry

