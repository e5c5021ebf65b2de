"""Progress bars (rich) for every stage that can take more than a second or two.

Off when stderr is not a terminal and LORAMIX_PROGRESS is unset; LORAMIX_PROGRESS=1 forces them on, =0 off."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, Iterator, TypeVar

from .errors import env_flag

T = TypeVar("T")


def enabled() -> bool:
    """LORAMIX_PROGRESS as a switch (errors.env_flag: 1 / true / on, 0 / false / off, any case), else whether stderr
    is a terminal."""
    env = env_flag("LORAMIX_PROGRESS")
    return sys.stderr.isatty() if env is None else env


@contextlib.contextmanager
def bar(description: str, total: int | None) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr (when enabled); yields advance(), to call once per finished item."""
    if not enabled():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    # descriptions may name entries and files: never read as rich markup
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True, markup=False)) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar."""
    with bar(description, total) as advance:
        for item in items:
            yield item
            advance()
