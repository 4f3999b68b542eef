"""How busy the machine is with work that is not the benchmark's: other people's tests skew every number.

A watcher process (this file, run as ``python bench/load.py PID INTERVAL``) samples every ``INTERVAL`` seconds
the CPU time the whole machine spent busy and the CPU time of process PID and all its descendants; the
difference is CPU used by everything else ("foreign" load). It runs in its own process so that sampling never
holds the benchmark process's GIL. A process of ours that ends between two samples loses its last partial
interval, so foreign load errs a little high. A :class:`Window` reads the samples that bracket a stretch of
time, so even a short workload gets a figure (averaged over at least one sampling interval).
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import threading
import time

import psutil

#: Average cores of other work (the hypervisor's steal time included) above which a workload counts as disturbed:
#: on a 2-core machine, 0.05 cores is 2.5 % of it, already more than the margin of the 97 % efficiency target.
DISTURBED_CORES = 0.05


def _busy() -> float:
    t = psutil.cpu_times()
    return (t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
            + getattr(t, "steal", 0.0))


def _tree(root: psutil.Process) -> dict[int, float]:
    out = {}
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        processes = [root]
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        out[process.pid] = times.user + times.system
    return out


def watch(pid: int, interval: float) -> None:
    """Print ``<monotonic time> <foreign CPU seconds so far>`` every interval until PID ends or stdin closes."""
    root = psutil.Process(pid)
    busy, ours, total = _busy(), _tree(root), 0.0
    print(f"{time.monotonic()} 0.0", flush=True)
    while root.is_running():
        time.sleep(interval)
        now_busy, now_ours = _busy(), _tree(root)
        mine = sum(v - ours.get(p, 0.0) for p, v in now_ours.items())
        total += max(0.0, (now_busy - busy) - mine)
        busy, ours = now_busy, now_ours
        try:
            print(f"{time.monotonic()} {total}", flush=True)
        except BrokenPipeError:
            return


class ForeignLoad:
    #: Seconds between samples. Each sample walks every process on the machine to find the benchmark's (about
    #: 1.7 ms here), and the watcher's CPU is taken from the benchmark's: every 0.25 s it cost 12 ms of CPU a
    #: second, half a point of parallel efficiency on 2 cores, against 6 ms now.
    INTERVAL = 0.5

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Condition()
        self._times: list[float] = []  # monotonic time of each sample (system-wide clock on Linux)
        self._totals: list[float] = []  # foreign CPU seconds from the start to that sample
        self._process: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._read, name="foreign-load", daemon=True)

    def start(self) -> ForeignLoad:
        self._process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()),
                                          str(self.interval)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                         text=True)
        self._thread.start()
        with self._lock:  # windows opened from now on have a sample before them
            self._lock.wait_for(lambda: bool(self._times), timeout=30)
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            t, total = map(float, line.split())
            with self._lock:
                self._times.append(t)
                self._totals.append(total)
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._thread.join(timeout=5)

    def cores(self, start: float, end: float) -> float | None:
        """Average foreign cores busy between the last sample at or before ``start`` and the first after ``end``."""
        with self._lock:
            self._lock.wait_for(lambda: bool(self._times) and self._times[-1] >= end, timeout=4 * self.interval + 1)
            i = bisect.bisect_right(self._times, start) - 1
            j = bisect.bisect_left(self._times, end)
            if i < 0 or j >= len(self._times) or j <= i:
                return None
            return (self._totals[j] - self._totals[i]) / (self._times[j] - self._times[i])


class Window:
    """Foreign load over a stretch of time, from its creation to :meth:`cores`."""

    def __init__(self, load: ForeignLoad | None) -> None:
        self.load = load
        self.start = time.monotonic()

    def cores(self) -> float | None:
        return None if self.load is None else self.load.cores(self.start, time.monotonic())


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
