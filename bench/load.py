"""How busy the machine is with work that is not the benchmark's: other people's tests skew every number.

A background thread samples, every ``interval`` seconds, the CPU time the whole machine spent busy and the CPU
time of this process and all its descendants; the difference is CPU used by everything else. A process of
ours that ends between two samples loses its last partial interval, so "foreign" load errs slightly high.
"""

from __future__ import annotations

import threading
import time

import psutil


class ForeignLoad:
    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.me = psutil.Process()
        self._lock = threading.Lock()
        self._foreign = 0.0  # CPU seconds used by others since start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreign-load", daemon=True)
        self._ours: dict[int, float] = {}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + \
            getattr(t, "steal", 0.0)

    def _tree(self) -> dict[int, float]:
        out = {}
        try:
            procs = [self.me, *self.me.children(recursive=True)]
        except psutil.Error:
            procs = [self.me]
        for p in procs:
            try:
                c = p.cpu_times()
                out[p.pid] = c.user + c.system
            except psutil.Error:
                pass
        return out

    def _run(self) -> None:
        busy = self._busy()
        self._ours = self._tree()
        while not self._stop.wait(self.interval):
            now_busy, now_ours = self._busy(), self._tree()
            ours = sum(v - self._ours.get(pid, 0.0) for pid, v in now_ours.items())
            with self._lock:
                self._foreign += max(0.0, (now_busy - busy) - ours)
            busy, self._ours = now_busy, now_ours

    def start(self) -> ForeignLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> float:
        with self._lock:
            return self._foreign


class Window:
    """Average foreign load (CPU cores busy with other work) over a stretch of time."""

    def __init__(self, load: ForeignLoad | None) -> None:
        self.load = load
        self.t0 = time.monotonic()
        self.c0 = load.cpu_seconds() if load else 0.0

    def cores(self) -> float | None:
        if self.load is None:
            return None
        elapsed = time.monotonic() - self.t0
        # the sampler lags by up to one interval; short windows read as noise, so report them as unknown
        if elapsed < 2 * self.load.interval:
            return None
        return (self.load.cpu_seconds() - self.c0) / elapsed
