"""The real :class:`~worker.policy.Sampler`: reads this machine with psutil (and ``xprintidle`` under X11).

- the owner's CPU use: the machine's CPU use minus that of this worker's own process tree (its task processes
  included), as a percent of the whole machine, measured between two reads;
- battery: ``psutil.sensors_battery()``; temperature: the hottest CPU sensor of ``psutil.sensors_temperatures()``
  (Linux and FreeBSD); both None where the machine has none;
- keyboard and mouse idle time: only under X11 with ``xprintidle`` installed; None elsewhere, and the rule that
  needs it is skipped.

Reads block for milliseconds (a subprocess for ``xprintidle``): call :meth:`MachineSampler.read` off the loop.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from typing import Any

from worker.policy import Readings
from worker.sysinfo import psutil

#: Sensor chips that measure the CPU itself (psutil names them after their Linux drivers).
CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal")


class MachineSampler:
    """Readings of this machine. Raises RuntimeError without psutil: the owner's rules need it."""

    def __init__(self) -> None:
        if psutil is None:
            raise RuntimeError("the owner's pause rules read the machine with psutil: pip install psutil")
        self._me = psutil.Process()
        self._ours: dict[int, Any] = {}  # pid -> psutil.Process, kept so cpu_percent measures between reads
        self._cpus = psutil.cpu_count() or 1
        self._xprintidle = shutil.which("xprintidle") if os.environ.get("DISPLAY") else None
        psutil.cpu_percent()  # the first call only starts the measurement
        self._our_cpu()

    def read(self) -> Readings:
        machine = psutil.cpu_percent()
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        return Readings(
            local_time=datetime.datetime.now().time(),
            owner_cpu=max(0.0, machine - self._our_cpu()),
            idle_seconds=self._idle_seconds(),
            on_battery=None if battery is None else not battery.power_plugged,
            battery_percent=None if battery is None else float(battery.percent),
            cpu_temp=_cpu_temperature())

    def _our_cpu(self) -> float:
        """Percent of the whole machine used by this process and its descendants since the last call."""
        try:
            tree = [self._me, *self._me.children(recursive=True)]
        except psutil.Error:
            tree = [self._me]
        known = {}
        total = 0.0
        for process in tree:
            process = self._ours.get(process.pid, process)
            try:
                total += process.cpu_percent()  # 0.0 the first time a process is seen
            except psutil.Error:
                continue
            known[process.pid] = process
        self._ours = known
        return total / self._cpus

    def _idle_seconds(self) -> float | None:
        if self._xprintidle is None:
            return None
        try:
            done = subprocess.run([self._xprintidle], capture_output=True, text=True, timeout=2, check=True)
            return int(done.stdout.strip()) / 1000
        except (OSError, subprocess.SubprocessError, ValueError):
            return None


def _cpu_temperature() -> float | None:
    if not hasattr(psutil, "sensors_temperatures"):
        return None
    try:
        sensors = psutil.sensors_temperatures()
    except (OSError, RuntimeError):
        return None
    readings = [entry.current for chip in CPU_SENSORS for entry in sensors.get(chip, []) if entry.current]
    return max(readings) if readings else None
