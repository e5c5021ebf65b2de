"""Parallel work whose results do not depend on the number of threads.

`threaded_map` runs items on a pool of threads, each torch op inside them on one thread (intra-op), so every
float reduction happens in one fixed order: the bytes of the results are the same at any thread count, in any
engine. The thread count is lowered only while a task runs and restored when the last running task ends,
however the caller leaves the iterator (consumed, abandoned or closed): nothing outlives the work that needed it."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_running = 0  # blocks inside one_thread_ops right now (threaded_map's tasks among them)
_restore = 1  # torch's thread count before the first of them started


@contextmanager
def one_thread_ops(restore: int | None = None) -> Iterator[None]:
    """Torch ops on one thread inside the block (multi-threaded MKL products, QR and SVD change their last bits with
    the thread count). Blocks may overlap across threads: the count is set back, to `restore` (default: the count
    when the first of them began), only when the last of them ends, so one block's end never gives another's ops
    back their threads."""
    global _running, _restore
    with _lock:
        if _running == 0:
            _restore = torch.get_num_threads() if restore is None else restore
        _running += 1
        torch.set_num_threads(1)  # also this thread's own OpenMP setting, whatever it was initialised with
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                torch.set_num_threads(_restore)


def _one_thread(fn: Callable[[T], R], item: T, restore: int) -> R:
    """fn(item) in one_thread_ops; `restore` is the count the map's caller saw when it started the map."""
    with one_thread_ops(restore):
        return fn(item)


def threaded_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                 pool: ThreadPoolExecutor | None = None) -> Iterator[R]:
    """fn(item) for each item, yielded in order, computed on `workers` threads (default: torch.get_num_threads())
    with single-threaded torch ops and at most `workers` + 1 items in flight. Faster than one item at a time with
    multi-threaded ops (which leave cores idle in small kernels), and bit-identical whatever `workers` is. `pool`:
    an executor of `workers` threads to run on, kept by the caller across maps (starting threads costs ~0.3 ms)."""
    restore = torch.get_num_threads()
    workers = max(1, workers or restore)
    with nullcontext(pool) if pool is not None else ThreadPoolExecutor(workers, thread_name_prefix="loramix") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(_one_thread, fn, item, restore))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
