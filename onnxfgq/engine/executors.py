"""Where a block's weight solves run: threads of this process, or a Ray cluster (``--executor ray``).

A block's solves are grouped by the input tensor the weights read (q, k and v share one: they share
its statistics and GPTQ's factorisation of them, so they solve one after another in one group); a
group is ``solve_group(wc, stats, items)``, a pure function of its arguments. Groups run in
parallel, and the results are taken back in the block's weight order, so the output does not depend
on which group finishes first, nor on the executor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.config import EXECUTORS, ConfigError, WeightConfig


def solve_group(wc: WeightConfig, stats: ActivationStats, items: Sequence[tuple[np.ndarray, QuantSpec]]
                ) -> list[QuantizedWeight]:
    """The weights ``items`` ([(float weight [K, N], spec)]) that read one input, solved on its
    ``stats`` with ``wc``'s algorithm, in order."""
    from onnxfgq.calibrated import _solver
    from onnxfgq.engine.runner import ColumnChunks

    solver = ColumnChunks(_solver(wc, stats))
    return [solver.solve(w, spec) for w, spec in items]


class ThreadExecutor:
    """Groups on a pool of threads (numpy releases the GIL in the linear algebra)."""

    name = "threads"

    def __init__(self, workers: int = 0):
        self.workers = workers or min(2, os.cpu_count() or 1)

    def map(self, wc: WeightConfig, groups: list[tuple[ActivationStats, list]]) -> Iterator[list[QuantizedWeight]]:
        """Each group's solved weights, in the order of ``groups``."""
        if self.workers <= 1 or len(groups) <= 1:
            yield from (solve_group(wc, st, items) for st, items in groups)
            return
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(solve_group, wc, st, items) for st, items in groups]
            del groups
            for f in futures:
                yield f.result()

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
        self.task = ray.remote(num_cpus=1)(solve_group)

    def map(self, wc: WeightConfig, groups: list[tuple[ActivationStats, list]]) -> Iterator[list[QuantizedWeight]]:
        """Each group's solved weights, in the order of ``groups`` (the tasks run in any order)."""
        refs = [self.task.remote(wc, st, items) for st, items in groups]
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
