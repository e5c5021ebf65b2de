"""Execution engines for the embarrassingly parallel stages (bank index, bank build, leave-one-out evaluation).

`local` runs the work in this process, in order. `ray` hands it to Ray (the optional extra `loramix[ray]`):
the cluster named by RAY_ADDRESS, or a local one started for the run. Work items travel by value and results
come back to the driver, which stores each one (atomically, as everywhere) as soon as it arrives: a lost worker
costs only its own items, and a rerun skips what is done. Per-worker state (a loaded model) is built once per
worker, in a Ray actor."""

from __future__ import annotations

import os
from typing import Any, Callable, Generic, Sequence, TypeVar

from .errors import LoramixError, setting
from .progress import bar, track
from .registry import Registry

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")


class Engine(Generic[T, R]):
    """Runs fn(state, item) for every item, state = setup() built once per worker; on_result(item, result) is
    called in the driver as each result arrives. Returns the results in item order."""

    name = "engine"

    def map(
        self,
        fn: Callable[[Any, T], R],
        items: Sequence[T],
        description: str,
        *,
        setup: Callable[[], Any] | None = None,
        on_result: Callable[[T, R], None] | None = None,
        gpus: float = 0.0,
    ) -> list[R]:
        raise NotImplementedError


ENGINES: Registry[type[Engine]] = Registry("engine")


def get_engine(name: str | Engine) -> Engine:
    return name if isinstance(name, Engine) else ENGINES.get(name)()


@ENGINES.register("local")
class Local(Engine):
    """In this process, one item after the other."""

    name = "local"

    def map(self, fn, items, description, *, setup=None, on_result=None, gpus=0.0):
        state = setup() if setup is not None and items else None
        results = []
        for item in track(items, description, total=len(items)):
            result = fn(state, item)
            if on_result is not None:
                on_result(item, result)
            results.append(result)
        return results


class _Worker:
    """A Ray actor: builds its state once, then runs items. Its threads are the CPUs Ray gave it."""

    def __init__(self, setup: Callable[[], Any] | None, fn: Callable[[Any, Any], Any], threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.fn = fn
        self.state = setup() if setup is not None else None

    def run(self, index: int, item: Any) -> tuple[int, Any]:
        return index, self.fn(self.state, item)

    def pid(self) -> int:
        return os.getpid()


@ENGINES.register("ray")
class RayEngine(Engine):
    """Ray actors, one per `cpus_per_worker` CPUs of the cluster (RAY_ADDRESS, else a local cluster), a GPU each
    when asked for and the cluster has them; at most one per item."""

    name = "ray"

    def __init__(self, cpus_per_worker: int = 1, max_workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise LoramixError(f"{setting('engine', 'ray')} needs Ray: pip install 'loramix[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True, log_to_driver=False,
                     include_dashboard=False, configure_logging=False)
        self.ray = ray
        self.cpus_per_worker = cpus_per_worker
        self.max_workers = max_workers

    def workers(self, n_items: int, gpus: float) -> int:
        resources = self.ray.cluster_resources()
        n = int(resources.get("CPU", 1) // self.cpus_per_worker)
        if gpus:
            n = min(n, int(resources.get("GPU", 0) // gpus)) or n
        return max(1, min(n, n_items, self.max_workers or n))

    def map(self, fn, items, description, *, setup=None, on_result=None, gpus=0.0):
        if not items:
            return []
        ray = self.ray
        has_gpu = gpus and self.ray.cluster_resources().get("GPU", 0) >= gpus
        actor = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=gpus if has_gpu else 0, max_restarts=0)(_Worker)
        pool = [actor.remote(setup, fn, self.cpus_per_worker) for _ in range(self.workers(len(items), gpus))]
        pending = {}
        queue = list(enumerate(items))
        for a in pool:
            if queue:
                i, item = queue.pop(0)
                pending[a.run.remote(i, item)] = a
        results: dict[int, Any] = {}
        failures = []
        with bar(description, len(items)) as advance:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                a = pending.pop(ref)
                try:
                    i, result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                    failures.append(str(e).splitlines()[0])
                    continue  # this worker is gone; its remaining share goes to the others
                except ray.exceptions.RayTaskError as e:
                    raise e.as_instanceof_cause() from None
                results[i] = result
                if on_result is not None:
                    on_result(items[i], result)
                advance()
                if queue:
                    j, item = queue.pop(0)
                    pending[a.run.remote(j, item)] = a
            for a in pool:
                ray.kill(a)
        if failures:
            raise LoramixError(f"{len(items) - len(results)} of {len(items)} items were lost with their Ray workers "
                               f"({failures[0]}); the finished ones are saved: run again to complete")
        return [results[i] for i in range(len(items))]
