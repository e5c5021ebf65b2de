"""Building a bank: one LoRA trained per task of a suite, with the task's train split beside it
(resumable: an entry already trained with the same settings and data is kept)."""

from __future__ import annotations

import json
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from .data import read_dataset
from .errors import LoramixError
from .files import atomic_write_bytes
from .progress import track
from .train import TRAINING_FILE, TrainConfig, train

DEFAULT_DIR = Path(__file__).parent / "default"
DEFAULT_BANK = DEFAULT_DIR / "bank"
DEFAULT_SUITE = DEFAULT_DIR / "suite"
# Suite tasks kept out of the committed default bank, so `make demo` meets a task the bank has not seen.
DEMO_TASKS = ("freedict_eng_deu", "countries_capital_to_country", "morphology_past_participle", "numbers_spanish")
# The committed bank's training settings: q/k/v like Lots-of-LoRAs; rank 6 so that 53 fp16 adapters of
# SmolLM2-135M (0.97 MB each) fit the 60 MB the repository allows the bank.
BANK_TRAINING = TrainConfig(steps=150, rank=6, alpha=12, save_dtype="float16")


def resolve_suite(suite: str | Path) -> Path:
    """'default' -> the suite shipped with loramix; anything else is a folder built by `loramix tasks build`."""
    path = DEFAULT_SUITE if str(suite) == "default" else Path(suite)
    if not path.is_dir():
        raise LoramixError(f"{path}: suite folder not found (build one with `loramix tasks build --out DIR`)")
    return path


def suite_tasks(suite: str | Path) -> list[str]:
    """Names of the tasks in a suite folder (subfolders with a train.jsonl), sorted."""
    return sorted(p.parent.name for p in resolve_suite(suite).glob("*/train.jsonl"))


def _is_built(dest: Path, config: TrainConfig, fingerprint: str) -> bool:
    try:
        record = json.loads((dest / TRAINING_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (
        (dest / "adapter_model.safetensors").is_file()
        and record.get("config") == asdict(config)
        and record.get("data", {}).get("fingerprint") == fingerprint
    )


def build_bank(
    suite: str | Path,
    out: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    exclude: Sequence[str] = DEMO_TASKS,
    config: TrainConfig = BANK_TRAINING,
    base: str | None = None,
    workers: int = 1,
) -> dict[str, str]:
    """Train one adapter per suite task (all but `exclude`, or just `tasks`) into OUT/<task>/ with its
    train.jsonl, in `workers` processes (CPU threads shared out). Returns task -> 'trained' or 'kept'
    (already built with these settings and data)."""
    suite_dir = resolve_suite(suite)
    names = list(tasks) if tasks else [t for t in suite_tasks(suite_dir) if t not in exclude]
    missing = [t for t in names if not (suite_dir / t / "train.jsonl").is_file()]
    if missing:
        raise LoramixError(f"{suite_dir}: no task(s) {', '.join(missing)}")
    jobs = [(suite_dir / task / "train.jsonl", Path(out) / task, config, base) for task in names]
    if workers <= 1:
        results = [_build_entry(*job) for job in track(jobs, "building bank", total=len(jobs))]
    else:
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_set_threads, initargs=(threads,)) as pool:
            futures = [pool.submit(_build_entry, *job) for job in jobs]
            for f in track(as_completed(futures), "building bank", total=len(futures)):
                f.result()  # re-raise a worker's error
            results = [f.result() for f in futures]
    return dict(zip(names, results))


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _build_entry(data_file: Path, dest: Path, config: TrainConfig, base: str | None) -> str:
    """Train one bank entry unless it is already built with these settings and data; 'trained' or 'kept'."""
    fingerprint = read_dataset(data_file).fingerprint()
    cfg = replace(config, seed=config.seed + zlib.crc32(dest.name.encode()) % 100_000)  # per task, stable
    status = "kept" if _is_built(dest, cfg, fingerprint) else "trained"
    if status == "trained":
        train(data_file, dest, cfg, base=base, force=True)
    if not (dest / "train.jsonl").is_file() or (dest / "train.jsonl").read_bytes() != data_file.read_bytes():
        atomic_write_bytes(dest / "train.jsonl", data_file.read_bytes())
    return status
