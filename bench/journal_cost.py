"""What the journal costs: tiny tasks through a remote client, the foreman with and without ``--data-dir``.

Starts ``python -m foreman --local-workers 2`` twice per round (in-memory journal; SQLite file in a temporary
data dir), connects with ``Foreman.connect`` and maps ``inc`` over N items, alternating the two so that a busy
machine disturbs both alike. Prints a table and one JSON line per run; the target is a cost under 20 % of
tiny-task throughput.

Usage: ``python bench/journal_cost.py [--tasks 200000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's CrowdCompute

import tasks  # noqa: E402
from foreman import Foreman  # noqa: E402


def run_once(n: int, data_dir: str | None) -> float:
    """Tasks per second of one map of ``inc`` over ``n`` items through a fresh foreman service."""
    command = [sys.executable, "-m", "foreman", "--port", "0", "--local-workers", "2", "--no-dashboard",
               "--log-level", "WARNING"]
    if data_dir is not None:
        command += ["--data-dir", data_dir]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    service = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert service.stdout is not None
        address = re.search(r"ws://\S+", service.stdout.readline())
        assert address is not None, "the foreman did not start"
        with Foreman.connect(address.group()) as fm:
            fm.wait_for_workers(2, timeout=60)
            fm.map(tasks.inc, range(2000))  # warm up: functions shipped, batch size learnt
            started = time.perf_counter()
            results = fm.map(tasks.inc, range(n))
            elapsed = time.perf_counter() - started
        assert results[-1] == n
        return n / elapsed
    finally:
        service.terminate()
        service.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"in memory": [], "SQLite file": []}
    for _ in range(args.rounds):
        rates["in memory"].append(run_once(args.tasks, None))
        with tempfile.TemporaryDirectory() as data_dir:
            rates["SQLite file"].append(run_once(args.tasks, data_dir))
    memory, disk = (statistics.median(rates[k]) for k in rates)
    print(f"{'journal':<12} {'tasks/s (median)':>17}  runs")
    for name, values in rates.items():
        print(f"{name:<12} {statistics.median(values):>17,.0f}  {', '.join(f'{v:,.0f}' for v in values)}")
    print(f"cost of the SQLite file: {100 * (1 - disk / memory):.1f} % of tiny-task throughput (target < 20 %)")
    print(json.dumps({"bench": "journal_cost", "tasks": args.tasks, "in_memory": rates["in memory"],
                      "sqlite": rates["SQLite file"], "cost_percent": 100 * (1 - disk / memory)}))


if __name__ == "__main__":
    main()
