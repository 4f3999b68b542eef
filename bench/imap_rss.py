"""``imap`` over long inputs: the peak RSS of the process that holds the embedded foreman.

Run by ``bench/run.py`` as a fresh process, so that what other backends left in the benchmark's own process
(Dask's and Ray's imports, freed payloads glibc keeps) is not counted. This process is what a user's script
is: it holds the embedded foreman, the feeder thread and the job. Nothing is subtracted; the start (before the
foreman), ready (workers connected) and peak (while each ``imap`` runs) values are reported as measured.

Usage: ``python bench/imap_rss.py N [N ...]``; prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's CrowdCompute

import tasks  # noqa: E402


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a background thread; tracks the peak."""

    def __init__(self, interval: float = 0.005) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def now(self) -> int:
        return self.process.memory_info().rss

    def reset(self) -> None:
        self.peak = self.now()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.now()
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str]) -> int:
    lengths = [int(x) for x in argv] or [1_000_000, 10_000_000]
    from foreman import Foreman

    mib = 1024 * 1024
    out: dict[str, object] = {"runs": []}
    with RssSampler() as sampler:
        out["rss_start_mb"] = sampler.now() / mib
        with Foreman(port=0, local_workers=2) as fm:
            fm.wait_for_workers(2, timeout=120)
            fm.submit(tasks.inc, 1).result(timeout=120)
            out["rss_ready_mb"] = sampler.now() / mib
            for n in lengths:
                sampler.reset()
                t0 = time.perf_counter()
                total = sum(fm.imap(tasks.inc, (i for i in range(n))))  # a generator: length unknown
                elapsed = time.perf_counter() - t0
                expected = n * (n + 1) // 2
                if total != expected:
                    raise SystemExit(f"imap over {n} items summed to {total}, expected {expected}")
                out["runs"].append({"n": n, "seconds": elapsed, "tasks_per_s": n / elapsed,  # type: ignore[union-attr]
                                    "peak_mb": sampler.peak / mib, "end_mb": sampler.now() / mib})
        out["peak_mb"] = max(r["peak_mb"] for r in out["runs"])  # type: ignore[union-attr]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
