"""The real :class:`~worker.policy.Sampler`: reads this machine with psutil (and ``xprintidle`` under X11).

- the owner's CPU use: the machine's CPU use minus that of this worker's own process tree (its task processes
  included), as a percent of the whole machine, measured between two reads;
- battery: ``psutil.sensors_battery()``; temperature: the hottest CPU sensor of ``psutil.sensors_temperatures()``
  (Linux and FreeBSD); both None where the machine has none;
- keyboard and mouse idle time: only under X11 with ``xprintidle`` installed; None elsewhere, and the rule that
  needs it is skipped.

Without psutil (a minimal install) only the clock and ``xprintidle`` are read: the CPU, battery and temperature
readings are None, so their rules are skipped (:data:`NEEDS_PSUTIL` names them) and the clock's still apply.

Reads block for milliseconds (a subprocess for ``xprintidle``): call :meth:`MachineSampler.read` off the loop.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time

from worker.policy import Readings
from worker.sysinfo import psutil

#: Sensor chips that measure the CPU itself (psutil names them after their Linux drivers).
CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal")

#: The rules whose readings come from psutil, by rule name, with the preference that switches each on.
NEEDS_PSUTIL = {"owner_cpu": "max_owner_cpu", "on_battery": "pause_on_battery", "low_battery": "min_battery",
                "hot_cpu": "max_cpu_temp"}


class MachineSampler:
    """Readings of this machine; without psutil, only the time of day and the keyboard's idle time."""

    def __init__(self) -> None:
        self._xprintidle = shutil.which("xprintidle") if os.environ.get("DISPLAY") else None
        if psutil is None:
            return
        self._me = psutil.Process()
        self._cpus = psutil.cpu_count() or 1
        self._seen: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds at the last read
        self._last = time.time()
        psutil.cpu_percent()  # the first call only starts the measurement
        self._our_cpu()

    def read(self) -> Readings:
        if psutil is None:
            return Readings(local_time=datetime.datetime.now().time(), idle_seconds=self._idle_seconds())
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
        """Percent of the whole machine used by this process and its descendants since the last call.

        From CPU times, so a task process started since the last read counts from its start (``cpu_percent``
        would count it as idle until its second read). The first call only sets the baseline.
        """
        now = time.time()
        try:
            tree = [self._me, *self._me.children(recursive=True)]
        except psutil.Error:
            tree = [self._me]
        used, seen = 0.0, {}
        for process in tree:
            try:
                with process.oneshot():
                    key = (process.pid, process.create_time())
                    times = process.cpu_times()
            except psutil.Error:
                continue
            seconds = times.user + times.system
            seen[key] = seconds
            before = self._seen.get(key, 0.0)  # not there at the last read: all its time is new
            used += max(0.0, seconds - before)
        elapsed, self._last, self._seen = max(now - self._last, 1e-6), now, seen
        return min(100.0, 100 * used / (elapsed * self._cpus))

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
