"""The chaos job's task. Workers import it by reference, as ``chaos.workload`` (``tests/`` is on their path).

``task(i)`` is deterministic and returns ``(i, value(i))``, so a result says which task it answers. Its duration
is mixed and seeded by ``i``: most tasks are ~0.1 ms of arithmetic plus 0.2-2 ms of sleep, 1 in 50 sleeps
5-30 ms, 1 in 500 sleeps 100-300 ms (a long batch that a fault is likely to catch in flight). Sleeping rather
than spinning keeps several workers busy on a 2-core machine without starving the foreman.
"""

from __future__ import annotations

import random
import time

MASK = (1 << 64) - 1


def value(i: int) -> int:
    """~0.1 ms of 64-bit LCG arithmetic: the part of the task that the serial reference computes."""
    h = i
    for _ in range(600):
        h = (h * 6364136223846793005 + 1442695040888963407) & MASK
    return h


def duration(i: int) -> float:
    """Seconds task ``i`` sleeps: the same on every worker and in every run."""
    rng = random.Random(i * 7919 + 17)
    x = rng.random()
    if x < 0.002:
        return rng.uniform(0.100, 0.300)
    if x < 0.022:
        return rng.uniform(0.005, 0.030)
    return rng.uniform(0.0002, 0.002)


def task(i: int) -> tuple[int, int]:
    time.sleep(duration(i))
    return i, value(i)


def expected(n: int) -> list[tuple[int, int]]:
    """``[task(i) for i in range(n)]``, computed serially in this process (without the sleeps, which change
    nothing in the results)."""
    return [(i, value(i)) for i in range(n)]
