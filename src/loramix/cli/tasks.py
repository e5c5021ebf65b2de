"""`loramix tasks`: build and list the task suite."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from ..errors import LoramixError
from .options import _table, out

tasks_app = typer.Typer(help="Build the task suite (one bank LoRA per task) from real data installed offline.", no_args_is_help=True)


@tasks_app.command("build")
def tasks_build(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the suite to (one subfolder per task)."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Build only this task (repeatable)."),
    seed: int = typer.Option(0, help="Seed for sampling, shuffling and splitting."),
) -> None:
    """Build every task whose sources are installed (or those named with --only) into OUT."""
    from ..tasks import build_suite

    report = build_suite(out_dir, only=only, seed=seed)
    table = _table(f"{out_dir}: {len(report.built)} tasks built, {len(report.skipped)} skipped", ["task", "family"],
                   ["train", "valid", "test"])
    for e in report.built:
        table.add_row(e["name"], e["family"], *(str(e["counts"][s]) for s in ("train", "valid", "test")))
    out.print(table)  # skipped tasks were logged as warnings
    if only and report.skipped:
        raise LoramixError(f"could not build {'; '.join(report.skipped.values())}")


@tasks_app.command("list")
def tasks_list() -> None:
    """Show the registered tasks: family, definition, and whether their sources are installed."""
    from ..tasks import SUITE, TASKS

    table = _table(f"{len(SUITE)} tasks", ["task", "family", "definition", "sources"])
    for name in SUITE:
        spec = TASKS.get(name)
        missing = spec.missing()
        table.add_row(name, spec.family, spec.definition, Text("; ".join(missing), style="red") if missing else "installed")
    out.print(table)
