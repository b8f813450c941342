"""Where a block's weight solves run: threads of this process, or a Ray cluster (``--executor ray``).

A block's solves are grouped by the input tensor the weights read (q, k and v share one: they share
its statistics and GPTQ's factorisation of them, so they solve one after another in one group); a
group is ``solve_group(wc, stats, items)``, a pure function of its arguments. Groups run in
parallel, and the results are taken back in the block's weight order, so the output does not depend
on which group finishes first. Every solve runs with one BLAS thread (``SOLVE_BLAS_THREADS``): OpenBLAS
splits some products differently for other thread counts, which changed GPTQ codes here (1 vs 2
threads); pinned, the solves give the same codes on every executor and with any number of solve
threads, and the parallelism comes from solving groups at once. (The statistics they read are
accumulated with the process's BLAS threads: a machine with another thread count can round those sums
differently, and GPTQ's codes can follow.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.config import EXECUTORS, ConfigError, WeightConfig

SOLVE_BLAS_THREADS = 1
PARALLEL_BYTES = 1 << 30  # groups solve at once only while their estimated working memory fits this


@dataclass(frozen=True)
class WeightRef:
    """A weight read only when its solve starts, so that a block's weights are not all held at once."""

    load: Callable[[], np.ndarray]
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def _loaded(items: Sequence) -> list:
    return [(w.load() if isinstance(w, WeightRef) else w, spec) for w, spec in items]


def solve_bytes(group: tuple[ActivationStats, list]) -> int:
    """Working memory of a group's solves, roughly: GPTQ holds the float64 Hessian, its inverse
    factor and a temporary of the same size, and each weight in float64 with its error."""
    stats, items = group
    k = items[0][0].shape[0] if items else 0
    return 3 * 8 * k * k + sum(2 * 8 * w.size for w, _ in items)


def solve_group(wc: WeightConfig, stats: ActivationStats, items: Sequence[tuple[np.ndarray, QuantSpec]]
                ) -> list[QuantizedWeight]:
    """The weights ``items`` ([(float weight [K, N], spec)]) that read one input, solved on its
    ``stats`` with ``wc``'s algorithm, in order."""
    from onnxfgq.calibrated import _solver
    from onnxfgq.engine.runner import ColumnChunks

    solver = ColumnChunks(_solver(wc, stats))
    return [solver.solve(w.load() if isinstance(w, WeightRef) else w, spec) for w, spec in items]


def solve_group_pinned(wc: WeightConfig, stats: ActivationStats, items) -> list[QuantizedWeight]:
    """``solve_group`` with the process's BLAS at ``SOLVE_BLAS_THREADS`` (a Ray worker's whole task)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(SOLVE_BLAS_THREADS, user_api="blas"):
        return solve_group(wc, stats, items)


class ThreadExecutor:
    """Groups on a pool of threads (numpy releases the GIL in the linear algebra), as many at once as
    fit ``budget`` bytes of estimated working memory (a 7B down-projection's solve alone is ~3 GB)."""

    name = "threads"

    def __init__(self, workers: int = 0, budget: int = PARALLEL_BYTES):
        self.workers = workers or os.cpu_count() or 1
        self.budget = budget

    def map(self, wc: WeightConfig, groups: list[tuple[ActivationStats, list]]) -> Iterator[list[QuantizedWeight]]:
        """Each group's solved weights, in the order of ``groups``. The BLAS limit is process-wide, so
        it is set once around the pool (a per-thread limit would be undone by the first to finish)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(SOLVE_BLAS_THREADS, user_api="blas"):
            if self.workers <= 1 or len(groups) <= 1:
                for st, items in groups:
                    yield solve_group(wc, st, items)
                return
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                futures = {}
                running: dict[int, int] = {}  # group -> its estimated memory, while it runs
                nxt = 0
                for i in range(len(groups)):
                    # start groups in order while they fit the memory budget (always at least one)
                    while nxt < len(groups) and len(running) < self.workers and (
                            not running or sum(running.values()) + solve_bytes(groups[nxt]) <= self.budget):
                        running[nxt] = solve_bytes(groups[nxt])
                        futures[nxt] = pool.submit(solve_group, wc, *groups[nxt])
                        nxt += 1
                    result = futures.pop(i).result()
                    running.pop(i, None)
                    groups[i] = None  # its weights and statistics are no longer needed here
                    yield result

    def close(self) -> None:
        pass


class RayExecutor:
    """Groups as Ray tasks (one CPU each) on the cluster ``ray.init`` connects to: the one in
    ``RAY_ADDRESS`` if set, else a local one started here (and stopped at the end)."""

    name = "ray"

    def __init__(self):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor", "ray is not installed: pip install 'onnxfgq[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, include_dashboard=False,
                     configure_logging=False)
        self.task = ray.remote(num_cpus=1)(solve_group_pinned)

    def map(self, wc: WeightConfig, groups: list[tuple[ActivationStats, list]]) -> Iterator[list[QuantizedWeight]]:
        """Each group's solved weights, in the order of ``groups`` (the tasks run in any order)."""
        refs = [self.task.remote(wc, st, _loaded(items)) for st, items in groups]  # arrays travel, not readers
        del groups
        for ref in refs:
            yield self.ray.get(ref)

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False


def make_executor(name: str):
    if name == "threads":
        return ThreadExecutor()
    if name == "ray":
        return RayExecutor()
    raise ConfigError("--executor", f"choose one of {', '.join(EXECUTORS)}, got {name!r}")
