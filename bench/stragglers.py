"""Stragglers: one slow volunteer among fast ones, job time with and without speculative copies.

    python bench/stragglers.py [--tasks 200] [--slowdown 10] [--repeat 3]

Three workers at full speed and one ``--slowdown`` times slower (it sleeps longer per task: a slow device, without
fighting the fast workers for this machine's two cores). Without speculation the job waits for the slow worker's
last batches; with it, idle fast workers rerun those batches and the first result wins.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from foreman import Foreman  # noqa: E402
from tasks import SLOWDOWN_VARIABLE  # noqa: E402


def nap(seconds: float) -> float:
    """Sleep ``seconds`` times this worker's slowdown; returns the slowdown (who ran it)."""
    factor = float(os.environ.get(SLOWDOWN_VARIABLE, "1"))
    time.sleep(seconds * factor)
    return factor


def run(speculation: float | None, tasks: int, slowdown: float) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    with Foreman(port=0, dashboard=False, speculation=speculation) as fm:
        workers = [subprocess.Popen([sys.executable, "-m", "worker", fm.address, "--concurrency", "1",
                                     "--worker-id", f"w{i}", "--no-dashboard", "--log-level", "ERROR"],
                                    env=dict(env, **{SLOWDOWN_VARIABLE: str(slowdown if i == 0 else 1)}),
                                    stdin=subprocess.DEVNULL) for i in range(4)]
        try:
            fm.wait_for_workers(4)
            fm.map(abs, range(8), chunksize=1)  # every worker's task process up: the job times scheduling only
            started = time.perf_counter()
            factors = fm.map(nap, [0.02] * tasks)
            elapsed = time.perf_counter() - started
            return elapsed, sum(1 for f in factors if f != 1) / tasks
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--slowdown", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ideal = args.tasks * 0.02 / (3 + 1 / args.slowdown)
    print(f"{args.tasks} tasks of 20 ms, 3 fast workers and 1 {args.slowdown:g}x slower; ideal {ideal:.2f} s")
    print("| speculation | job time, median of runs (s) | runs (s) | results from the slow worker |")
    print("|---|---|---|---|")
    for label, speculation in (("off", None), ("on (3x)", 3.0)):
        runs = [run(speculation, args.tasks, args.slowdown) for _ in range(args.repeat)]
        times = [t for t, _ in runs]
        share = statistics.mean(s for _, s in runs)
        print(f"| {label} | {statistics.median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} | "
              f"{share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
