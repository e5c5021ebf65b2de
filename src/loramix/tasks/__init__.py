"""The task suite: small Natural-Instructions-style tasks built deterministically from real data that installs
offline (PyPI and Debian packages), one LoRA of the bank per task.

`build_suite(out)` writes every task whose sources are installed; `TASKS` is the registry of builders (one
`TaskSpec` per task, named `<family>_<what>`), `SUITE` their names, `build_task(name)` builds one in memory."""

from __future__ import annotations

# Importing a family module registers its tasks; this order is the suite's order.
from . import wordnet, freedict, countries, pronunciation, morphology, symbols, news, numbers, tabular  # noqa: F401, I001
from .build import SuiteReport, build_suite, write_task
from .core import CAP, SPLITS, TASKS, Task, TaskSpec, build_task

SUITE: list[str] = TASKS.names()
FAMILIES: list[str] = list(dict.fromkeys(TASKS.get(n).family for n in SUITE))

__all__ = ["CAP", "FAMILIES", "SPLITS", "SUITE", "TASKS", "SuiteReport", "Task", "TaskSpec", "build_suite", "build_task", "write_task"]
