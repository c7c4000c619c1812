"""A pool of Ray workers, each holding one engine, that runs fixed units of work (`--ray` of eval, repro, verify).

    with WorkerPool(partial(make_backend, args), address=None, workers=2) as pool:
        info = pool.call(info_of)                         # on one worker: what the manifest records
        for key, result in pool.map(generate_unit, units):   # units: [(key, payload)], results as they finish
            ...                                            # the caller (the driver) writes them, alone

Each worker is a Ray actor built by `factory()` (a picklable callable, such as a functools.partial of a
module-level function) on ONE torch thread, so under `batch_invariant` every worker computes the bits a
single process on one thread computes (under `exact` any thread count gives them). A unit runs on one
worker as `fn(engine, payload)`; its result comes back to the driver, which is the only process that
writes the run folder, so a unit is recorded once or not at all. A worker that dies (killed, out of
memory, its node gone) is replaced by a fresh one and its unit is redone there (at most `attempts`
times per unit); an exception raised by `fn` is a bug, not a death, and is raised in the driver.

Ray is imported here, on first use only: commands without --ray never load it. When Ray is not
initialised yet, address "local" starts a private local cluster (shut down again on exit; one found
running is not joined: "auto" joins it), another address joins that cluster, whose nodes must run the
same ditto and model files. A caller that has called ray.init() itself keeps its cluster.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

WORKER_THREADS = 1  # torch threads per worker: the bits under batch_invariant depend on the thread count
KILL_HOOK_ENV = "DITTO_RAY_TEST_KILL"  # test hook "UNIT_KEY:MARKER": the worker running that unit dies once


class _Worker:
    """One engine in one Ray actor process (wrapped by ray.remote in WorkerPool)."""

    def __init__(self, factory: Callable[[], Any], threads: int, kill_hook: str | None) -> None:
        import torch

        torch.set_num_threads(threads)
        self.engine = factory()
        self.kill_hook = kill_hook

    def run(self, fn: Callable[[Any, Any], Any], key: str, payload: Any) -> Any:
        result = fn(self.engine, payload)
        if self.kill_hook:  # after the work, before the answer: the worst moment to die
            unit, marker = self.kill_hook.split(":", 1)
            if unit == key and not Path(marker).exists():
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    def call(self, fn: Callable[[Any], Any]) -> Any:
        return fn(self.engine)

    def pid(self) -> int:
        return os.getpid()


def no_engine() -> None:
    """The factory of workers whose units build their own engine (repro: one per configuration)."""
    return None


class UnitFailed(RuntimeError):
    pass


class WorkerPool:
    """`workers` Ray actors (default: the cluster's CPUs, at most `max_workers`), each with one engine."""

    def __init__(
        self,
        factory: Callable[[], Any],
        *,
        address: str = "local",
        workers: int | None = None,
        max_workers: int | None = None,
        attempts: int = 3,
        threads: int = WORKER_THREADS,
    ) -> None:
        self.factory, self.address, self.requested, self.threads = factory, address, workers, threads
        self.max_workers, self.attempts = max_workers, attempts
        self.actors: list = []
        self.started_ray = False
        self.deaths = 0
        self.redone: list[str] = []

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> WorkerPool:
        import ray

        if not ray.is_initialized():
            # the workers' output stays in Ray's logs: stdout carries only the command's results
            ray.init(address=self.address, log_to_driver=False, include_dashboard=False)
            self.started_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = self.requested or max(1, cpus // self.threads)
        if self.max_workers:
            n = max(1, min(n, self.max_workers))
        self._remote = ray.remote(num_cpus=self.threads, max_restarts=0)(_Worker)
        self.actors = [self._new_actor() for _ in range(n)]
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.started_ray:
            ray.shutdown()

    def _new_actor(self):
        return self._remote.remote(self.factory, self.threads, os.environ.get(KILL_HOOK_ENV))

    # -- work ----------------------------------------------------------------------------------

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(engine)` on the first worker (the engine's info for a manifest, say)."""
        import ray

        return ray.get(self.actors[0].call.remote(fn))

    def call_all(self, fn: Callable[[Any], Any]) -> list:
        """`fn(engine)` on every worker, in worker order (their engine counters at the end of a job)."""
        import ray

        return ray.get([a.call.remote(fn) for a in self.actors])

    def map(self, fn: Callable[[Any, Any], Any], units: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Run `fn(engine, payload)` for every (key, payload) unit; yields (key, result) as units finish.

        One unit in flight per worker. A unit whose worker died goes back to the front of the queue on a
        fresh worker; after `attempts` deaths on the same unit, UnitFailed."""
        import ray
        from ray.exceptions import RayActorError

        queue = deque(units)
        tries: dict[str, int] = {}
        idle = list(self.actors)
        flight: dict = {}  # ObjectRef -> (actor, key, payload)
        while queue or flight:
            while queue and idle:
                actor, (key, payload) = idle.pop(), queue.popleft()
                tries[key] = tries.get(key, 0) + 1
                flight[actor.run.remote(fn, key, payload)] = (actor, key, payload)
            ready, _ = ray.wait(list(flight), num_returns=1)
            actor, key, payload = flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError:
                self.deaths += 1
                if tries[key] >= self.attempts:
                    raise UnitFailed(f"unit {key}: its worker died {tries[key]} times") from None
                self.redone.append(key)
                queue.appendleft((key, payload))
                fresh = self._new_actor()
                self.actors[self.actors.index(actor)] = fresh
                idle.append(fresh)
                continue
            idle.append(actor)
            yield key, result

    def record(self) -> dict:
        """What a manifest says about the pool: where it ran, how many workers, what was redone."""
        import ray

        return {
            "address": self.address,
            "workers": len(self.actors),
            "threads_per_worker": self.threads,
            "ray": ray.__version__,
            "worker_deaths": self.deaths,
            "units_redone": list(self.redone),
        }


# -- the flags of `ditto eval|repro|verify --ray` ---------------------------------------------------


ONE_ENGINE = (
    "holds one engine on ONE torch thread (so batch_invariant and exact give the bits of a single process on "
    "one thread, whatever the number of workers)"
)


IN_THE_FOLDER = "results stream into the same --out folder, resumable as without --ray"


def add_ray_args(p: argparse.ArgumentParser, what: str, worker: str = ONE_ENGINE, results: str = IN_THE_FOLDER) -> None:
    """--ray [ADDRESS] and --ray-workers N; `what` names the units ("problems", "configurations", ...),
    `worker` says what a worker does with them, `results` where their results go."""
    g = p.add_argument_group("ray (pip install 'ditto[ray]')")
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help=f"spread the {what} over a Ray cluster: a private local one started for this run when no ADDRESS "
        "is given, else the cluster at ADDRESS (ray://head:10001, head:6379, or auto: $RAY_ADDRESS or the one "
        "`ray start` left running here; its nodes need the same ditto and model files). "
        f"Each worker {worker}; a killed worker's work is redone on a fresh one; {results}",
    )
    g.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray workers to start (default: as many as the cluster's CPUs hold, at most one per unit)",
    )


def ray_address(args: argparse.Namespace) -> str:
    """The address for ray.init: "local" starts a private local cluster (never joins one found running)."""
    return args.ray or "local"


def check_ray_args(args: argparse.Namespace) -> None:
    """UsageError for --ray without Ray installed, or a --ray-workers below 1."""
    from ditto import cli_checks as check

    if getattr(args, "ray", None) is None:
        check.check(getattr(args, "ray_workers", None) is None, "ray_workers", "used with --ray", args.ray_workers)
        return
    check.positive(args, "ray_workers")
    if importlib.util.find_spec("ray") is None:
        raise check.UsageError("argument --ray: Ray is not installed (pip install 'ditto[ray]')")


def worker_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of the parsed flags for the workers' engine factory: one torch thread, no callables."""
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})
    ns.threads = WORKER_THREADS
    return ns
