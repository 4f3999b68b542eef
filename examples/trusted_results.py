"""Results you can trust from strangers: redundancy, a comparator, spot checks, reputation and credit.

    python examples/trusted_results.py

A foreman with one local worker (trusted: the operator's own) and two volunteers from a token file, alice and
mallory. Mallory's worker lies: it adds one to every answer. With ``redundancy=2`` each task runs on two
workers and is accepted only when both agree; a disagreement brings in a third. Mallory is outvoted, then
quarantined. A ``spot_check`` job re-runs a share of its batches on the trusted local worker. At the end the
script prints reputations and the leaderboard, as the dashboard and ``/api/leaderboard`` show them.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from foreman import Foreman

TOKENS = '[workers]\nalice = "w-alice-example-token"\nmallory = "w-mallory-example-token"\n'


def collatz_steps(n: int) -> int:
    """Steps for n to reach 1; on a worker started with EXAMPLE_CHEAT set, one more (a wrong answer)."""
    steps = 0
    while n > 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps + 1 if os.environ.get("EXAMPLE_CHEAT") else steps


def harmonic(n: int) -> float:
    """1 + 1/2 + ... + 1/n summed in an order of this process's choosing: the last bits differ between replicas,
    so they are compared with a tolerance."""
    terms = [1 / k for k in range(1, n + 1)]
    random.Random(os.getpid()).shuffle(terms)
    return sum(terms)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12)


def volunteer(fm: Foreman, name: str, cheat: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CROWDCOMPUTE_TOKEN": f"w-{name}-example-token",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if cheat:
        env["EXAMPLE_CHEAT"] = "1"
    return subprocess.Popen([sys.executable, "-m", "worker", fm.address, "--worker-id", name, "--concurrency", "1",
                             "--no-dashboard", "--log-level", "ERROR"], env=env)


def api(fm: Foreman, path: str) -> dict:
    with urllib.request.urlopen(f"{fm.dashboard_url}api/{path}", timeout=10) as response:
        return json.load(response)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.toml"
        tokens.write_text(TOKENS)
        with Foreman(port=0, token_file=str(tokens), local_workers=1) as fm:
            workers = [volunteer(fm, "alice", cheat=False), volunteer(fm, "mallory", cheat=True)]
            try:
                fm.wait_for_workers(3, timeout=60)
                steps = fm.map(collatz_steps, range(1, 201), redundancy=2, chunksize=5)
                correct = steps == [collatz_steps(n) for n in range(1, 201)]  # this process does not cheat
                print(f"{len(steps)} results with redundancy=2, all correct: {correct}")
                sums = fm.map(harmonic, range(1, 51), redundancy=2, comparator=close)
                print(f"harmonic numbers agreed within 1e-12: H(50) ~= {sums[49]:.6f}")
                checked = fm.map(collatz_steps, range(1, 101), spot_check=0.5)
                print(f"spot-checked job: {len(checked)} results, 27 takes {checked[26]} steps")
                for worker in api(fm, "workers"):
                    r = worker["reputation"]
                    print(f"{worker['volunteer']}: {'trusted' if worker['trusted'] else r['state']} "
                          f"({r['agreements']} agreed, {r['disagreements']} disagreed)")
                print("leaderboard (volunteer: validated / tasks):")
                for row in api(fm, "leaderboard")["volunteers"]:
                    print(f"  {row['volunteer']}: {row['validated']} / {row['tasks']}")
            finally:
                for worker in workers:
                    worker.terminate()
                    worker.wait(timeout=30)


if __name__ == "__main__":
    main()
