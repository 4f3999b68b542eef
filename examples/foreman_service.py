"""A standalone foreman shared by scripts: a detached job, picked up again by another process, and asyncio.

The example starts the service itself (as an operator would, with ``crowdcompute foreman``), with a token file,
a data dir and two local workers, then acts as two client scripts:

    python examples/foreman_service.py

Against a foreman you already run, give its address and a client token instead:

    python examples/foreman_service.py --address ws://HOST:9000 --token c-...
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from foreman import Foreman


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def start_service(data_dir: Path) -> tuple[subprocess.Popen[str], str, str]:
    """``crowdcompute foreman`` with a token file and a journal in ``data_dir``; returns it, its address and a
    client token."""
    tokens = data_dir / "tokens.toml"
    tokens.write_text('[workers]\nlocal = "w-example-token"\n[clients]\nalice = "c-example-token"\n')
    service = subprocess.Popen([sys.executable, "-m", "foreman", "--port", "0", "--token-file", str(tokens),
                                "--data-dir", str(data_dir), "--local-workers", "2", "--no-dashboard",
                                "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    assert service.stdout is not None
    address = re.search(r"ws://\S+", service.stdout.readline())
    if address is None:
        raise SystemExit("the foreman did not start")
    return service, address.group(), "c-example-token"


async def in_an_event_loop(address: str, token: str) -> None:
    """What a FastAPI handler or a notebook cell would do."""
    async with Foreman.connect(address, token=token) as fm:
        longest = max([s async for s in fm.aimap(collatz_steps, range(1, 2001))])
        print(f"asyncio: longest Collatz chain below 2,001 takes {longest} steps; "
              f"27 takes {await fm.asubmit(collatz_steps, 27)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="a running foreman's ws:// address (default: start one here)")
    parser.add_argument("--token", help="a client token of that foreman")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        service = None
        address, token = args.address, args.token
        if address is None:
            service, address, token = start_service(Path(data))
        try:
            with Foreman.connect(address, token=token) as fm:  # script 1: submit and leave
                fm.wait_for_workers(1, timeout=60)
                print("map:", fm.map(collatz_steps, range(1, 11)))
                job_id = fm.submit_job(collatz_steps, range(1, 10_001)).id
                print(f"submitted detached job {job_id}")
            with Foreman.connect(address, token=token) as fm:  # script 2, later: pick it up by its id
                job = fm.job(job_id)
                steps = job.results(timeout=120)
                print(f"job {job_id}: {job.state}, {len(steps):,} results, longest chain {max(steps)} steps")
                print("stored jobs:", [(j["id"], j["state"]) for j in fm.jobs()])
            asyncio.run(in_an_event_loop(address, token))
        finally:
            if service is not None:
                service.terminate()
                service.wait(timeout=30)


if __name__ == "__main__":
    main()
