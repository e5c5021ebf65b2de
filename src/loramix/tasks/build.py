"""Writing tasks to disk: DIR/<task>/task.json (Natural-Instructions format plus `Splits`), DIR/<task>/{train,valid,
test}.jsonl (the definition, a blank line, then the input), and DIR/suite.json (one summary per task)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..arguments import checked
from ..data import write_jsonl
from ..errors import LoramixError
from ..progress import track
from .core import SPLITS, TASKS, Task, build_task

log = logging.getLogger("loramix.tasks")


def dump_json(obj, path: Path) -> None:
    """Write `obj` as UTF-8 JSON (ensure_ascii off, one-space indent, keys in insertion order) with a final newline."""
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def summary(task: Task) -> dict:
    """The task's entry in suite.json."""
    return {"name": task.name, "family": task.family, "definition": task.definition, "source": task.source,
            "license": task.license, "counts": task.counts()}


def write_task(task: Task, out: str | Path) -> Path:
    """Write `task` into OUT/<task.name>/ (task.json and one JSONL file per split); returns that folder."""
    folder = Path(out) / task.name
    folder.mkdir(parents=True, exist_ok=True)
    dump_json(task.to_ni(), folder / "task.json")
    for split in SPLITS:
        write_jsonl(task.split(split), folder / f"{split}.jsonl")
    return folder


@dataclass
class SuiteReport:
    """What `build_suite` did: the summaries of the tasks built, and the skipped tasks with why."""

    out: Path
    built: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@checked
def build_suite(out: str | Path, only: Sequence[str] | None = None, seed: int = 0) -> SuiteReport:
    """Build every registered task (or those named in `only`) whose sources are installed into OUT, and write
    OUT/suite.json, keeping the entries of tasks built there before that this call did not rebuild. Returns
    the report; skipped tasks are also logged. Raises LoramixError for a name in `only` that is not a task."""
    out = Path(out)
    names = list(only) if only else TASKS.names()
    for name in names:
        TASKS.get(name)  # unknown names fail before anything is built
    from ..bank import has_entries

    if out.is_file() or has_entries(out):
        raise LoramixError(f"{out}: " + ("is a file" if out.is_file() else "is a bank (it holds adapter entries)")
                           + ": a suite is written to a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    report = SuiteReport(out)
    for name in track(names, "building tasks", total=len(names)):
        try:
            task = build_task(name, seed)
        except LoramixError as e:
            report.skipped[name] = str(e)
            log.warning("skipped %s", e)
            continue
        write_task(task, out)
        report.built.append(summary(task))
    suite_file = out / "suite.json"
    entries = {e["name"]: e for e in (json.loads(suite_file.read_text(encoding="utf-8")) if suite_file.exists() else [])}
    entries.update((e["name"], e) for e in report.built)
    order = {n: i for i, n in enumerate(TASKS.names())}
    dump_json(sorted(entries.values(), key=lambda e: (order.get(e["name"], len(order)), e["name"])), suite_file)
    return report
