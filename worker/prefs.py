"""The owner's preferences: when the worker steps aside, and how much of the machine it may use.

Set by flags of ``python -m worker`` or by a TOML file (``--config prefs.toml``) with the same names::

    max_owner_cpu = 25          # pause while the owner's own programs use more than 25 % of the machine...
    resume_owner_cpu = 10       # ...until they use less than 10 %
    min_user_idle = 60          # pause when the keyboard or mouse was used in the last minute (X11 + xprintidle)
    pause_on_battery = true
    min_battery = 30            # pause below 30 % on battery
    max_cpu_temp = 85           # degrees Celsius, where sensors exist
    active_hours = ["19:00-08:00"]
    max_cores = 2               # at most 2 tasks at once
    max_cpu = 50                # task processes use at most 50 % of the machine (duty cycle)
    pause_grace = 30            # running tasks get 30 s to finish when the worker pauses, then go back
    pause_after = 10            # a rule must object for 10 s before the worker pauses...
    resume_after = 120          # ...and have no objection for 2 minutes before it resumes
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.policy import ActiveHours, HotCpu, LowBattery, OnBattery, OwnerCpu, Policy, Rule, UserActive, Window

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


_NUMBER = (int, float)
#: The type each setting must have (checked, since a TOML file may hold anything).
_KINDS: dict[str, type | tuple[type, ...]] = {
    "pause_on_battery": bool, "active_hours": tuple, "max_cores": int,
    **{name: _NUMBER for name in ("max_owner_cpu", "resume_owner_cpu", "min_user_idle", "resume_user_idle",
                                  "min_battery", "max_cpu_temp", "max_cpu", "pause_grace", "pause_after",
                                  "resume_after", "sample_interval")},
}
_DESCRIBE: dict[type | tuple[type, ...], str] = {
    bool: "true or false", tuple: "a list of HH:MM-HH:MM windows", int: "a whole number", _NUMBER: "a number"}


@dataclass(frozen=True)
class Prefs:
    """The owner's preferences; every rule is off until set.

    :param max_owner_cpu: pause while the owner's programs (everything but this worker) use more than this
        percent of the machine.
    :param resume_owner_cpu: resume once they use less than this percent (default: half of ``max_owner_cpu``).
    :param min_user_idle: pause when the keyboard or mouse was used in the last this many seconds.
    :param resume_user_idle: resume once they have been idle this many seconds (default: ``2 * min_user_idle``).
    :param pause_on_battery: pause while the machine runs on battery.
    :param min_battery: pause while discharging below this percent (resume 5 points above, or on mains power).
    :param max_cpu_temp: pause while the CPU is hotter than this many °C (resume 5 °C cooler).
    :param active_hours: run only inside these daily windows, ``"HH:MM-HH:MM"`` (may cross midnight).
    :param max_cores: run at most this many tasks at once (lowers the concurrency).
    :param max_cpu: task processes together use at most this percent of the machine, by stopping and continuing
        them in turn (POSIX); a task's time limit keeps running while it is stopped.
    :param pause_grace: seconds running tasks get to finish when the worker pauses; then they are stopped and
        go back to the foreman, to resume from their last checkpoint elsewhere.
    :param pause_after: seconds a rule must object before the worker pauses (ignores spikes).
    :param resume_after: seconds no rule may object before the worker resumes (stops flapping).
    :param sample_interval: seconds between readings of the machine.
    """

    max_owner_cpu: float | None = None
    resume_owner_cpu: float | None = None
    min_user_idle: float | None = None
    resume_user_idle: float | None = None
    pause_on_battery: bool = False
    min_battery: float | None = None
    max_cpu_temp: float | None = None
    active_hours: tuple[str, ...] = ()
    max_cores: int | None = None
    max_cpu: float | None = None
    pause_grace: float = 30.0
    pause_after: float = 10.0
    resume_after: float = 60.0
    sample_interval: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.active_hours, str):
            object.__setattr__(self, "active_hours", (self.active_hours,))
        elif isinstance(self.active_hours, list):  # from TOML
            object.__setattr__(self, "active_hours", tuple(self.active_hours))
        for f in dataclasses.fields(self):  # a TOML file may hold anything: check the types first
            value, kind = getattr(self, f.name), _KINDS[f.name]
            if value is not None and not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
                raise ValueError(f"{f.name} must be {_DESCRIBE[kind]}, got {value!r}")
        for name in ("max_owner_cpu", "resume_owner_cpu", "min_battery", "max_cpu"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 100:
                raise ValueError(f"{name} is a percent between 0 and 100, got {value}")
        for name in ("min_user_idle", "resume_user_idle", "pause_grace", "pause_after", "resume_after"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # NaN too
                raise ValueError(f"{name} is a number of seconds >= 0, got {value}")
        if not self.sample_interval > 0:
            raise ValueError(f"sample_interval must be > 0 seconds, got {self.sample_interval}")
        if self.max_owner_cpu is not None and (self.resume_owner_cpu or 0) > self.max_owner_cpu:
            raise ValueError(f"resume_owner_cpu ({self.resume_owner_cpu}) must not be above max_owner_cpu "
                             f"({self.max_owner_cpu}), or the worker would flap")
        if self.max_cores is not None and self.max_cores < 1:
            raise ValueError(f"max_cores must be >= 1, got {self.max_cores}")
        self.windows()  # a malformed window is an error now, not at the first reading

    @classmethod
    def load(cls, path: str | os.PathLike[str], **overrides: Any) -> Prefs:
        """Preferences from a TOML file, with ``overrides`` (flags given) taking precedence; ValueError saying what
        is wrong with the file."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the preferences file {path}: {exc}") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**{**data, **overrides})
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def windows(self) -> tuple[Window, ...]:
        """The ``active_hours`` windows, parsed."""
        return tuple(Window.parse(text) for text in self.active_hours)

    def rules(self) -> list[Rule]:
        """The rules these preferences switch on."""
        rules: list[Rule] = []
        if self.max_owner_cpu is not None:
            resume = self.resume_owner_cpu if self.resume_owner_cpu is not None else self.max_owner_cpu / 2
            rules.append(OwnerCpu(self.max_owner_cpu, resume))
        if self.min_user_idle is not None:
            resume = self.resume_user_idle if self.resume_user_idle is not None else 2 * self.min_user_idle
            rules.append(UserActive(self.min_user_idle, max(resume, self.min_user_idle)))
        if self.pause_on_battery:
            rules.append(OnBattery())
        if self.min_battery is not None:
            rules.append(LowBattery(self.min_battery))
        if self.max_cpu_temp is not None:
            rules.append(HotCpu(self.max_cpu_temp))
        if self.active_hours:
            rules.append(ActiveHours(self.windows()))
        return rules

    def policy(self, clock: Callable[[], float] = time.monotonic) -> Policy:
        """A fresh :class:`Policy` applying these preferences."""
        return Policy(self.rules(), clock, self.pause_after, self.resume_after)
