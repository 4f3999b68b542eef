"""A foreman open to strangers, done safely: TLS, per-worker tokens, results loaded as plain data only.

    python examples/secure_fleet.py          (needs trustme for the throwaway certificate: pip install trustme)

It makes a throwaway certificate authority and server certificate, a token file with one worker token and one
client token, starts a foreman on wss:// that does not trust its workers' pickles, and a worker that verifies
the foreman's certificate before sending its token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import trustme

from foreman import Foreman


def cube(x: int) -> int:
    return x ** 3


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(folder / "foreman.pem"))
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        (folder / "tokens.toml").write_text('[workers]\nvolunteer-1 = "w-example-token-1"\n'
                                            '[clients]\nanalyst = "c-example-token-2"\n')

        with Foreman(port=0, certfile=str(folder / "foreman.pem"), token_file=str(folder / "tokens.toml"),
                     trust_workers=False) as fm:
            print(f"foreman at {fm.address}, dashboard at {fm.dashboard_url}")
            env = {**os.environ, "CROWDCOMPUTE_TOKEN": "w-example-token-1",
                   "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            worker = subprocess.Popen([sys.executable, "-m", "worker", fm.address, "--cafile", str(folder / "ca.pem"),
                                       "--concurrency", "2", "--worker-id", "volunteer-1", "--no-dashboard",
                                       "--log-level", "WARNING"], env=env)
            try:
                fm.wait_for_workers(1, timeout=30)
                print(f"worker {fm.workers[0]} verified the foreman and joined")
                print("cubes:", fm.map(cube, range(10)))
            finally:
                worker.terminate()
                worker.wait(timeout=30)


if __name__ == "__main__":
    main()
