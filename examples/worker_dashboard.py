"""Watch a worker through its dashboard: a foreman, one worker process with its dashboard, a job, its /stats.

    python examples/worker_dashboard.py [--port 8001] [--below N] [--keep-open SECONDS]

Open the printed address in a browser for the live page (pass --keep-open 300 to have time to look); the JSON
API and Prometheus metrics sit next to it, as docs/worker-api.md describes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from foreman import Foreman

ROOT = Path(__file__).resolve().parent.parent


def is_prime(n: int) -> bool:
    """Trial division: slow enough per task to show up on the dashboard's CPU chart."""
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_for_dashboard(url: str, timeout: float = 30.0) -> None:
    """Until ``url`` + health answers at all (503 while the worker is still connecting counts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            get_json(url + "health")
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="the worker dashboard's port (default: any free one)")
    parser.add_argument("--below", type=int, default=200_000, help="count the primes below this (default 200,000)")
    parser.add_argument("--keep-open", type=float, default=0, help="seconds to keep running after the job")
    args = parser.parse_args()

    port = args.port or free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with Foreman(port=0) as fm:
        worker = subprocess.Popen([sys.executable, "-m", "worker", fm.address, "--concurrency", "2",
                                   "--dashboard-port", str(port), "--log-level", "WARNING"],
                                  env=env, stdin=subprocess.DEVNULL)
        try:
            fm.wait_for_workers(1, timeout=30)
            url = f"http://127.0.0.1:{port}/"
            wait_for_dashboard(url)
            print(f"worker dashboard at {url}  (JSON: {url}stats, Prometheus: {url}metrics)")

            primes = sum(fm.map(is_prime, range(args.below)))
            print(f"{primes:,} primes below {args.below:,}")
            print("GET /stats ->", json.dumps(get_json(url + "stats")["stats"], indent=2))
            if args.keep_open:
                print(f"keeping the worker up for {args.keep_open:.0f}s (Ctrl-C to stop)")
                time.sleep(args.keep_open)
        finally:
            worker.terminate()
            worker.wait(timeout=15)


if __name__ == "__main__":
    main()
