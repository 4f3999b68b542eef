"""Watch a job on the foreman's dashboard: a progress bar in the terminal, the fleet in the browser.

    python examples/fleet_dashboard.py [--tasks N] [--linger SECONDS]

Open the printed dashboard address while it runs; ``--linger`` keeps it up afterwards.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

from foreman import Foreman


def collatz_steps(n: int) -> int:
    """Steps for n to reach 1 under the Collatz map: cheap to state, irregular in cost."""
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=300_000)
    parser.add_argument("--linger", type=float, default=0.0, help="seconds to keep the dashboard up at the end")
    args = parser.parse_args()

    with Foreman(port=0, local_workers=2) as fm:
        print(f"dashboard: {fm.dashboard_login_url}   (workers dial {fm.address})", flush=True)
        steps = fm.map(collatz_steps, range(1, args.tasks + 1), progress=True)
        best = max(range(len(steps)), key=steps.__getitem__) + 1
        print(f"longest Collatz chain below {args.tasks + 1:,}: {best:,} ({max(steps)} steps)")
        with urllib.request.urlopen(fm.dashboard_url + "api/jobs") as response:
            job = json.load(response)[0]
        print(f"job {job['id']} ({job['name']}): {job['state']}, {job['done']:,} tasks in {job['elapsed']:.2f}s")
        time.sleep(args.linger)


if __name__ == "__main__":
    main()
