"""Building a bank: one LoRA trained per task of a suite, with the task's train split beside it
(resumable: an entry already trained with the same settings and data is kept)."""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .arguments import checked
from .data import read_dataset
from .errors import LoramixError
from .engine import get_engine
from .files import atomic_dir, atomic_write_bytes, read_json, refuse_target
from .runtime import base_paths
from .paths import resolve_suite
from .train import TRAINING_FILE, train
from .train_config import BANK_TRAINING, TrainConfig

# Suite tasks kept out of the committed default bank, so `make demo` meets a task the bank has not seen.
DEMO_TASKS = ("freedict_eng_deu", "countries_capital_to_country", "morphology_past_participle", "numbers_spanish")


def suite_tasks(suite: str | Path) -> list[str]:
    """Names of the tasks in a suite folder (subfolders with a train.jsonl), sorted."""
    return sorted(p.parent.name for p in resolve_suite(suite).glob("*/train.jsonl"))


def _is_built(dest: Path, config: TrainConfig, fingerprint: str, base_identity: str | None) -> bool:
    try:
        record = read_json(dest / TRAINING_FILE)
    except (OSError, LoramixError):
        return False
    return (
        isinstance(record, dict) and isinstance(record.get("data"), dict) and
        (dest / "adapter_model.safetensors").is_file()
        and record.get("config") == config.as_record()
        and record.get("data", {}).get("fingerprint") == fingerprint
        and record.get("base_identity") == base_identity  # the same base, by content (runtime.base_identity)
    )


@checked
def build_bank(
    suite: str | Path,
    out: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    exclude: Sequence[str] = DEMO_TASKS,
    config: TrainConfig = BANK_TRAINING,
    base: str | None = None,
    engine: str = "local",
) -> dict[str, str]:
    """Train one adapter per suite task (all but `exclude`, or just `tasks`) into OUT/<task>/ with its
    train.jsonl, on `engine` (see loramix.engine; each entry is written as soon as it is trained). Returns
    task -> 'trained' or 'kept' (already built with these settings and data)."""
    suite_dir = resolve_suite(suite)
    names = list(dict.fromkeys(tasks)) if tasks else [t for t in suite_tasks(suite_dir) if t not in exclude]
    for t in names:  # a task is a folder of the suite, and its entry a folder of OUT: a name, never a path
        if t in ("", ".", "..") or Path(t).name != t or "/" in t or (os.altsep or "/") in t:
            raise LoramixError(f"{t!r} is not a task name (a folder of the suite {suite_dir}, named without a path)")
    missing = [t for t in names if not (suite_dir / t / "train.jsonl").is_file()]
    if missing:
        raise LoramixError(f"{suite_dir}: no task(s) {', '.join(missing)}")
    out = Path(out)
    # OUT may exist (resumable), but not be or lie inside what the build reads
    refuse_target(out, force=True, inputs={"the suite": suite_dir, "the base model": base_paths(base)})
    status, jobs = {}, []
    from .runtime import base_identity

    identity = base_identity(base)
    for task in names:
        dataset = read_dataset(suite_dir / task / "train.jsonl")
        cfg = replace(config, seed=config.seed + zlib.crc32(task.encode()) % 100_000)  # per task, stable
        if _is_built(out / task, cfg, dataset.fingerprint(), identity):
            status[task] = "kept"
            _write_data(out / task, suite_dir / task / "train.jsonl")
        else:
            jobs.append((task, dataset, cfg, base))

    def store(job: tuple, files: dict[str, bytes]) -> None:
        task = job[0]
        with atomic_dir(out / task, force=True) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            (tmp / "train.jsonl").write_bytes((suite_dir / task / "train.jsonl").read_bytes())
        status[task] = "trained"

    get_engine(engine).map(_train_entry, jobs, "building bank", on_result=store, gpus=1.0)
    return {t: status[t] for t in names}


def _train_entry(state: None, job: tuple) -> dict[str, bytes]:
    """Train one entry (on whichever worker runs it) and return its adapter folder's files."""
    task, dataset, cfg, base = job
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / task
        train(dataset, folder, cfg, base=base)
        return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _write_data(dest: Path, data_file: Path) -> None:
    if not (dest / "train.jsonl").is_file() or (dest / "train.jsonl").read_bytes() != data_file.read_bytes():
        atomic_write_bytes(dest / "train.jsonl", data_file.read_bytes())
