"""Per-layer precision under a size budget: pick one option (bit width, block layout) per layer to
minimise the summed measured sensitivity (relative output error on calibration data, or relative
weight error) while the average stored bits per weight, scales and zero points included, stays at or
under ``target_bits``.

A Lagrangian allocation: for a price ``lam`` each layer takes ``argmin(error + lam * bits / weights)``;
``lam`` is bisected to the cheapest price that fits the budget, then any budget left is spent
greedily on the upgrades that buy the most error per bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from onnxfgq.algorithms.adaptive import Choice
from onnxfgq.config import ConfigError


class BudgetError(ConfigError):
    def __init__(self, message: str):
        super().__init__("--target-bits", message)


def average_bits(picks: Sequence[Choice], sizes: Sequence[int]) -> float:
    return sum(c.storage_bits for c in picks) / max(sum(sizes), 1)


def check_budget(floor_bits: int, weights: int, target_bits: float) -> None:
    """BudgetError unless ``target_bits`` per weight covers ``floor_bits`` (the cheapest options' total)."""
    if floor_bits > target_bits * weights:
        raise BudgetError(f"{target_bits} is below what even the cheapest options need: "
                          f"{floor_bits / max(weights, 1):.6f} bits per weight")


def allocate(options: Sequence[Sequence[Choice]], sizes: Sequence[int], target_bits: float) -> list[Choice]:
    """One choice per layer (``options[i]``, a layer of ``sizes[i]`` weights) under ``target_bits``."""
    total = sum(sizes)
    budget = target_bits * total
    check_budget(sum(min(c.storage_bits for c in o) for o in options), total, target_bits)

    def pick(lam: float) -> list[Choice]:
        return [min(o, key=lambda c: (c.error + lam * c.storage_bits / n, c.storage_bits))
                for o, n in zip(options, sizes)]

    lo, hi = 0.0, 1.0
    while sum(c.storage_bits for c in pick(hi)) > budget and hi < 1e12:
        hi *= 4
    if sum(c.storage_bits for c in pick(lo)) <= budget:
        picks = pick(lo)
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(c.storage_bits for c in pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        picks = pick(hi)
    return _spend_rest(options, picks, budget)


def _spend_rest(options: Sequence[Sequence[Choice]], picks: list[Choice], budget: float) -> list[Choice]:
    used = sum(c.storage_bits for c in picks)
    while True:
        best = None
        for i, o in enumerate(options):
            for c in o:
                extra = c.storage_bits - picks[i].storage_bits
                gain = picks[i].error - c.error
                if gain > 0 and extra >= 0 and used + extra <= budget:
                    ratio = gain / max(extra, 1)
                    if best is None or ratio > best[0]:
                        best = (ratio, i, c, extra)
        if best is None:
            return picks
        _, i, c, extra = best
        picks[i] = c
        used += extra


def compare_uniform(options: Sequence[Sequence[Choice]], picks: Sequence[Choice], sizes: Sequence[int],
                    ks: Sequence[int], target_bits: float) -> tuple[str, float, float, float] | None:
    """The allocation ``picks`` against the best *uniform* plan under the same budget, both priced by
    the options' summed errors: one bit width and one ``--block-size B`` for every layer (a layer of
    ``K <= B`` inputs then has one block per channel, as a fixed run would give it; per-channel is
    ``B`` = infinity), among those every layer offers. Returns (``4-bit g64``-style label, its bits per
    weight, its summed error, the picks' summed error), or None when no uniform plan fits or an error
    is not finite. The sum is what the allocation minimises, so the difference is the allocation's own
    prediction of what choosing per layer gains."""
    blocks = {c.block for o, k in zip(options, ks) for c in o if c.block < k} | {math.inf}
    widths = {c.spec.bits for o in options for c in o}
    best = None
    for bits in widths:
        for b in blocks:
            chosen = []
            for o, k in zip(options, ks):
                match = [c for c in o if c.spec.bits == bits and (c.block >= k if b >= k else c.block == b)]
                if not match:
                    break
                chosen.append(min(match, key=lambda c: c.storage_bits))
            else:
                err = sum(c.error for c in chosen)
                label = f"{bits}-bit " + ("per-channel" if b == math.inf else f"g{b}")
                avg = average_bits(chosen, sizes)
                if avg <= target_bits and math.isfinite(err) and (best is None or err < best[2]):
                    best = (label, avg, err)
    mine = sum(c.error for c in picks)
    if best is None or not math.isfinite(mine):
        return None
    return best[0], best[1], best[2], mine
