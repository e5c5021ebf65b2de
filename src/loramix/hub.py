"""Banks from the Hugging Face hub: the Lots-of-LoRAs collection (the paper's bank: one Mistral-7B-Instruct-v0.2
LoRA per Super-Natural-Instructions task, each with its dataset), the public LoRA adapters of one base model, and
any local or hub adapter added to a bank.

Downloads go through huggingface_hub (snapshot_download), so HF_HUB_OFFLINE=1 serves them from the local cache.
Every entry records what it was made from, with the pinned revisions, in `source.json`."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Sequence

import torch

from .adapter import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, read_config
from .arguments import Range, checked
from .bank import DATA_FILE, Bank, BankEntry, check_bank_path, check_entries, has_entries
from .data import Sample, read_dataset, to_sample, write_jsonl
from .errors import LoramixError, setting, first_line, hub_errors
from .files import atomic_dir, clear_leftovers, locked_folder, read_json, refuse_target
from .progress import track
from .registry import Registry

log = logging.getLogger("loramix")

LOTS_OF_LORAS = "Lots-of-LoRAs"
ADAPTER_REPO = LOTS_OF_LORAS + "/Mistral-7B-Instruct-v0.2-4b-r16-{task}"
SOURCE_FILE = "source.json"
_TASK = re.compile(r"^(task\d+)_[A-Za-z0-9_.-]+$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ADAPTER_TAG = "base_model:adapter:{base}"  # the hub's tag on the adapters of a base model
# `loramix bank pull` collections: name -> fn(out, *, limit=None, tasks=None) -> {entry: 'pulled', 'kept' or 'refused: ...'}
COLLECTIONS: Registry = Registry("collection")


def safe_entry_name(name: str) -> str:
    """`name` if it is a plain folder name (letters, digits, '_', '.', '-'); never a path that leaves the bank."""
    if not _SAFE_NAME.match(name) or name in (".", "..") or ".." in name:
        raise LoramixError(f"{name!r} is not a valid bank entry name (ASCII letters, digits, '_', '.', '-', at most 128; no path)")
    return name


def _snapshot(repo_id: str, repo_type: str = "model", allow: Sequence[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=list(allow) if allow else None))
    except (LocalEntryNotFoundError, ValueError, *hub_errors()) as e:  # ValueError: an invalid repo id
        raise LoramixError(f"{repo_id}: cannot download ({first_line(e)})") from None


def _cached_repos(repo_type: str) -> list:
    """The repositories of `repo_type` in the local hub cache (huggingface_hub's CachedRepoInfo)."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == repo_type]
    except CacheNotFound:  # no hub cache folder at all: nothing cached
        return []


def _cached_base(repo) -> str | None:
    """The base model (trailing '/' stripped) named by the cached adapter_config.json of a cached model repo's
    main revision, which is what snapshot_download serves offline; None without a readable one."""
    main = repo.refs.get("main")
    try:
        config = read_json(main.snapshot_path / CONFIG_FILE) if main else None
    except (LoramixError, OSError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base.rstrip("/") if isinstance(base, str) else None


def lots_of_loras_datasets() -> dict[str, str]:
    """Task id (e.g. 'task081') -> dataset repo id of the Lots-of-LoRAs collection: listed on the hub, or, with
    HF_HUB_OFFLINE=1, from the datasets of that collection in the local hub cache."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        ids = [r.repo_id for r in _cached_repos("dataset")]
    else:
        try:
            ids = [d.id for d in HfApi().list_datasets(author=LOTS_OF_LORAS)]
        except hub_errors() as e:
            raise LoramixError(f"cannot list the {LOTS_OF_LORAS} datasets on the hub ({first_line(e)})") from None
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


def _write_entry(dest: Path, adapter_dir: Path, samples: Sequence[Sample] | None, source: dict[str, Any], *,
                 force: bool = False) -> None:
    """An entry folder, written atomically: the adapter's two files (validated by the caller), train.jsonl when
    `samples` are given, and source.json."""
    with atomic_dir(dest, force=force) as tmp:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(adapter_dir / name, tmp / name)
        if samples is not None:
            write_jsonl(samples, tmp / DATA_FILE)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


# What a pull fetches for one entry: () -> (adapter folder, train samples or None, source.json record).
Fetch = Callable[[], tuple[Path, Sequence[Sample] | None, dict[str, Any]]]


def _pull(out: Path, jobs: Sequence[tuple[str, Fetch]], what: str) -> dict[str, str]:
    """Write one entry per job (entry name, fetch) into the bank OUT; entry -> 'pulled', 'kept' (an entry with a
    source.json: resumable) or 'refused: <reason>' (an unsafe name, a failed download, data `generate` would refuse,
    an adapter LoraAdapter refuses, or one `check_entries` refuses beside the bank's entries and those pulled so far;
    the others go on). Nothing half-written; no bank folder left empty; raises when every `what` was refused."""
    status: dict[str, str] = {}
    with _bank_write(out, wait=10.0):
        accepted = Bank(out).entries if has_entries(out) else []
        for name, fetch in track(jobs, f"pulling {len(jobs)} {what}s", total=len(jobs)):
            try:
                if (out / safe_entry_name(name) / SOURCE_FILE).is_file():
                    status[name] = "kept"
                    continue
                adapter_dir, samples, source = fetch()
                entry = BankEntry(name, LoraAdapter(adapter_dir, name=name), None)
                check_weights(entry.adapter)
                check_entries(accepted + [entry])  # before anything is written
                _write_entry(out / name, adapter_dir, samples, source)
            except LoramixError as e:  # one bad adapter or dataset leaves the others to pull
                log.warning("refused %s: %s", name, e)
                status[name] = f"refused: {e}"
                continue
            accepted.append(entry)
            status[name] = "pulled"
        if all(v.startswith("refused") for v in status.values()):
            raise LoramixError(f"{out}: every {what} was refused ({'; '.join(status.values())})")
        Bank(out)  # the result must be a valid bank
    return status


@COLLECTIONS.register("lots-of-loras")
def pull_lots_of_loras(out: str | Path, *, limit: int | None = None, tasks: Sequence[str] | None = None) -> dict[str, str]:
    """Download Lots-of-LoRAs adapters and their datasets' train splits into the bank OUT, one entry per task,
    named like the dataset (`task081_<slug>`). Resumable: entries already there are kept. Returns entry -> status."""
    refuse_pull_target(out)
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

    def fetch(task: str, dataset_repo: str):
        adapter_repo = ADAPTER_REPO.format(task=task)
        adapter_dir = _snapshot(adapter_repo, allow=[CONFIG_FILE, WEIGHTS_FILE])
        data_dir = _snapshot(dataset_repo, repo_type="dataset")
        source = {"adapter": adapter_repo, "adapter_revision": adapter_dir.name,
                  "dataset": dataset_repo, "dataset_revision": data_dir.name, "split": "train"}
        return adapter_dir, _train_samples(data_dir, dataset_repo), source

    jobs = [(available[t].split("/", 1)[1], partial(fetch, t, available[t])) for t in wanted]
    return _pull(Path(out), jobs, "task")


@checked
def base_model_adapters(base: str, *, filters: Sequence[str] | None = None,
                        limit: Annotated[int, Range(1, None)] | None = None) -> list[str]:
    """Repo ids of the adapters of the model `base` whose ids contain every one of `filters` (case-insensitive), at
    most `limit`: the hub's listing under the tag base_model:adapter:<base>, most downloaded first (the hub's order),
    or, with HF_HUB_OFFLINE=1, the cached model repos whose cached adapter_config.json names `base`, sorted by id."""
    from huggingface_hub import HfApi, constants

    base, wanted = base.rstrip("/"), [f.lower() for f in filters or ()]

    def listing() -> Iterable[str]:
        if constants.HF_HUB_OFFLINE:
            return sorted(r.repo_id for r in _cached_repos("model") if _cached_base(r) == base)
        models = HfApi().list_models(filter=ADAPTER_TAG.format(base=base), search=max(wanted, key=len) if wanted else None,
                                     sort="downloads", limit=None if wanted else limit)  # the ids are filtered below
        return (m.id for m in models)

    try:
        return list(islice((r for r in listing() if all(f in r.lower() for f in wanted)), limit))
    except hub_errors() as e:
        raise LoramixError(f"cannot list the adapters of {base} ({first_line(e)})") from None


def _base_adapter(repo: str, name: str, base: str) -> tuple[Path, None, dict[str, Any]]:
    """`pull_base`'s fetch: the adapter repo's snapshot, refused if its config names a model other than `base` (the
    hub lists adapters by their model card's tags, and the bank's base must not depend on which comes first)."""
    adapter_dir = _snapshot(repo, allow=[CONFIG_FILE, WEIGHTS_FILE])
    named = read_config(adapter_dir, name).get("base_model_name_or_path")
    if named and named.rstrip("/") != base:
        raise LoramixError(f"{name}: adapter_config.json field 'base_model_name_or_path' is {named!r}, but it is "
                           f"listed as an adapter of {base!r}")
    return adapter_dir, None, {"adapter": repo, "adapter_revision": adapter_dir.name, "base": base,
                               "listing": ADAPTER_TAG.format(base=base)}


@checked
def pull_base(out: str | Path, base: str, *, limit: Annotated[int, Range(1, None)] | None = None,
              filters: Sequence[str] | None = None) -> dict[str, str]:
    """Download the public LoRA adapters of the model `base` (`base_model_adapters`: at most `limit` tried, after
    `filters`) into the bank OUT, one entry per adapter repo, named `<owner>__<name>`, without training data.
    Resumable: entries already there are kept. Returns entry -> 'pulled', 'kept' or 'refused: <reason>'."""
    refuse_pull_target(out)
    base = base.rstrip("/")
    if not base:
        raise LoramixError("the base model id is empty")
    repos = base_model_adapters(base, filters=filters, limit=limit)
    if not repos:
        raise LoramixError(f"no adapters of {base} found{' matching ' + ', '.join(map(repr, filters)) if filters else ''} "
                           "(offline: none in the local hub cache)")
    names = {r: r.replace("/", "__") for r in repos}
    clashes: dict[str, str] = {}  # repo -> why it gets no entry: its name is another repo's ('a/b__c', 'a__b/c')
    for repo, name in names.items():
        others = [r for r, n in names.items() if n == name and r != repo]
        source = Path(out) / name / SOURCE_FILE
        held = read_json(source).get("adapter") if source.is_file() else None
        if others or (held is not None and held != repo):
            clashes[repo] = f"refused: its entry name {name} is also that of {', '.join(others) or held}"
    jobs = [(n, partial(_base_adapter, r, n, base)) for r, n in names.items() if r not in clashes]
    for repo, why in clashes.items():
        log.warning("refused %s: %s", repo, why.removeprefix("refused: "))
    if not jobs:
        raise LoramixError(f"{out}: every adapter was refused ({'; '.join(clashes.values())})")
    return {**_pull(Path(out), jobs, "adapter"), **clashes}


def check_weights(adapter: LoraAdapter) -> None:
    """Refuse an adapter whose weights hold a NaN or an Inf (read module by module): in a bank it would make every
    composition that reads it fail, so it is refused before it is written (LoraAdapter checks only the header)."""
    for module in sorted(adapter.modules):
        if not all(bool(torch.isfinite(t).all()) for t in adapter.factors(module)):
            raise LoramixError(f"{adapter.name}: module '{module}' has NaN or Inf weights")


def add_adapter(bank: str | Path, source: str, data: str | Path, *, name: str | None = None, force: bool = False) -> Path:
    """Add an adapter (a local folder or a hub model id) with its training data (any format loramix reads) to a
    bank, as BANK/<name>/. The bank must stay valid (same base model, compatible shapes), else nothing is kept.
    Concurrent adds to one bank run one after the other (`_bank_write`), each checked against the entries the others
    wrote."""
    bank = Path(bank)
    check_bank_path(bank)
    if Path(source).is_dir():  # checked before the bank folder is made (inside the adapter, it would change it)
        entry = safe_entry_name(name or Path(source).resolve().name)  # '.', 'x/..': the folder's own name
        refuse_target(bank / entry, force=True, inputs={"the adapter": source, "the data": data})
    with _bank_write(bank, wait=120.0):
        return _add_adapter(bank, source, data, name=name, force=force)


def hub_cache() -> Path:
    """The local hub cache, where downloads go (and what a bank pull reads)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def refuse_pull_target(out: str | Path) -> None:
    """`bank pull --out` must not be, hold or lie inside the local hub cache it reads its downloads from."""
    check_bank_path(Path(out))
    refuse_target(out, force=True, inputs={"the hub cache": hub_cache()})


@contextlib.contextmanager
def _bank_write(bank: Path, *, wait: float):
    """Hold the bank's write lock (files.locked_folder: the folder is created if missing, and removed when the write
    fails and it is left empty) for a write of entries, after clearing what writes that died left in it (hidden .tmp
    folders of a killed `bank add`). `wait`: seconds to wait for another write to finish before refusing."""
    with locked_folder(bank, "bank", timeout=wait):
        clear_leftovers(bank)
        yield


def _add_adapter(bank: Path, source: str, data: str | Path, *, name: str | None, force: bool) -> Path:
    local = Path(source)
    adapter_dir = local if local.is_dir() else _snapshot(source, allow=[CONFIG_FILE, WEIGHTS_FILE])
    entry = safe_entry_name(name or (local.resolve().name if local.is_dir() else source.rsplit("/", 1)[-1]))
    if (bank / entry).exists() and not force:
        raise LoramixError(f"{bank / entry}: the bank already has an entry '{entry}' (use {setting('force', True)} to replace it)")
    refuse_target(bank / entry, force=True, inputs={"the adapter": adapter_dir, "the data": data})
    dataset = read_dataset(data)
    new = BankEntry(entry, LoraAdapter(adapter_dir, name=entry), None)
    check_weights(new.adapter)
    others = [e for e in Bank(bank).entries if e.name != entry] if has_entries(bank) else []
    check_entries(others + [new])  # before anything is written
    record = {"adapter": str(local.resolve()) if local.is_dir() else source, "data": str(data)}
    if not local.is_dir():
        record["adapter_revision"] = adapter_dir.name
    _write_entry(bank / entry, adapter_dir, dataset.samples, record, force=force)
    return bank / entry

