"""Estimate pi by Monte Carlo on a foreman with local workers: the README's first command.

    python examples/quickstart.py [--workers N] [--tasks T] [--port P]

Each task throws darts at the unit square with its own seed; the foreman gathers the hit counts in order.
"""

from __future__ import annotations

import argparse
import random
import time

from foreman import Foreman


def count_hits(seed: int, darts: int = 200_000) -> int:
    """How many of ``darts`` random points in the unit square land inside the quarter circle."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(darts):
        x, y = rng.random(), rng.random()
        hits += x * x + y * y <= 1.0
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    parser.add_argument("--tasks", type=int, default=40, help="tasks of 200,000 darts each (default 40)")
    parser.add_argument("--port", type=int, default=0, help="foreman port (default: any free port)")
    args = parser.parse_args()

    started = time.perf_counter()
    with Foreman(port=args.port, local_workers=args.workers) as fm:
        # No token given: the foreman made one up. Its address carries a worker-only token, so more workers on
        # this machine join with it as it is; the dashboard's link logs the browser in with the admin token.
        print(f"foreman listening at {fm.address}  (more workers join with: python -m worker '{fm.address}')")
        print(f"dashboard at {fm.dashboard_login_url}" if fm.dashboard_url else
              "no dashboard: pip install 'crowdcompute[dashboard]' adds it")
        hits = fm.map(count_hits, range(args.tasks))
        darts = args.tasks * 200_000
        print(f"pi ~= {4 * sum(hits) / darts:.5f} from {darts:,} darts in {args.tasks} tasks "
              f"on {args.workers} workers, {time.perf_counter() - started:.2f}s")


if __name__ == "__main__":
    main()
