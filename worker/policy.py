"""When the worker steps aside: the owner's rules, judged on a :class:`Readings` snapshot. Pure: no I/O, the clock
is injected.

Each rule has hysteresis twice over. Its thresholds differ (pause above 25 % of the owner's CPU use, resume below
10 %), and its verdict must hold for a while before it takes effect: ``pause_after`` seconds to pause (a passing
spike does not), ``resume_after`` seconds to resume (the owner who just stopped typing is given time). A reading the
machine cannot give (no battery, no sensors, no way to learn when the keyboard was last used) is ``None``: its rule
is skipped, never guessed.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

#: Percentage points above ``min_battery`` the battery must reach before a rule that paused for it resumes.
BATTERY_MARGIN = 5.0
#: Degrees below ``max_cpu_temp`` the CPU must cool to before a rule that paused for it resumes.
TEMP_MARGIN = 5.0


@dataclass(frozen=True)
class Readings:
    """What the machine looks like now; ``None`` where the platform does not tell."""

    local_time: datetime.time  # wall-clock time of day, for active hours
    owner_cpu: float | None = None  # percent of the whole machine used by everything but this worker
    idle_seconds: float | None = None  # since the keyboard or mouse was last used
    on_battery: bool | None = None
    battery_percent: float | None = None
    cpu_temp: float | None = None  # degrees Celsius, the hottest CPU sensor


class Sampler(Protocol):
    """Where readings come from: :class:`worker.readings.MachineSampler`, or a test's own."""

    def read(self) -> Readings: ...


class Rule(Protocol):
    """One of the owner's conditions. ``judge`` returns why to pause now, or None for no objection; ``paused``
    says whether this rule holds the worker paused, so the rule applies its resume threshold instead."""

    name: str

    def judge(self, readings: Readings, paused: bool) -> str | None: ...


@dataclass(frozen=True)
class OwnerCpu:
    """Pause while the owner's own programs use more than ``pause_above`` % of the machine."""

    pause_above: float
    resume_below: float
    name: str = "owner_cpu"

    def judge(self, readings: Readings, paused: bool) -> str | None:
        cpu = readings.owner_cpu
        if cpu is None or (cpu < self.resume_below if paused else cpu <= self.pause_above):
            return None
        return f"the owner's CPU use is {cpu:.0f}% (pause above {self.pause_above:g}%, resume below " \
               f"{self.resume_below:g}%)"


@dataclass(frozen=True)
class UserActive:
    """Pause while the keyboard or mouse was used in the last ``pause_below`` seconds; resume once they have been
    left alone for ``resume_above`` seconds."""

    pause_below: float
    resume_above: float
    name: str = "user_active"

    def judge(self, readings: Readings, paused: bool) -> str | None:
        idle = readings.idle_seconds
        if idle is None or idle >= (self.resume_above if paused else self.pause_below):
            return None
        return f"the keyboard or mouse was used {idle:.0f}s ago (resume after {self.resume_above:g}s idle)"


@dataclass(frozen=True)
class OnBattery:
    """Pause while the machine runs on its battery."""

    name: str = "on_battery"

    def judge(self, readings: Readings, paused: bool) -> str | None:
        return "running on battery" if readings.on_battery else None


@dataclass(frozen=True)
class LowBattery:
    """Pause while discharging below ``pause_below`` %; resume when charging or ``BATTERY_MARGIN`` points above."""

    pause_below: float
    name: str = "low_battery"

    def judge(self, readings: Readings, paused: bool) -> str | None:
        level = readings.battery_percent
        if level is None or readings.on_battery is False:
            return None
        if level >= (self.pause_below + BATTERY_MARGIN if paused else self.pause_below):
            return None
        return f"the battery is at {level:.0f}% (pause below {self.pause_below:g}%)"


@dataclass(frozen=True)
class HotCpu:
    """Pause while the CPU is hotter than ``pause_above`` °C; resume ``TEMP_MARGIN`` degrees cooler."""

    pause_above: float
    name: str = "hot_cpu"

    def judge(self, readings: Readings, paused: bool) -> str | None:
        temp = readings.cpu_temp
        if temp is None or temp <= (self.pause_above - TEMP_MARGIN if paused else self.pause_above):
            return None
        return f"the CPU is at {temp:.0f} °C (pause above {self.pause_above:g} °C)"


@dataclass(frozen=True)
class Window:
    """A daily span of wall-clock time, ``22:00-07:00`` (may cross midnight; ``00:00-00:00`` is all day)."""

    start: datetime.time
    end: datetime.time

    @classmethod
    def parse(cls, text: str) -> Window:
        try:
            start, end = (datetime.time.fromisoformat(part.strip()) for part in str(text).split("-"))
        except ValueError:
            raise ValueError(f"an active-hours window is HH:MM-HH:MM, e.g. 22:00-07:00, not {text!r}") from None
        return cls(start, end)

    def __contains__(self, moment: datetime.time) -> bool:
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class ActiveHours:
    """Work only inside these windows of the day."""

    windows: tuple[Window, ...]
    name: str = "active_hours"

    def judge(self, readings: Readings, paused: bool) -> str | None:
        if any(readings.local_time in window for window in self.windows):
            return None
        return f"outside the active hours {', '.join(map(str, self.windows))}"


@dataclass
class _RuleState:
    paused: bool = False
    reason: str = ""
    since: float | None = None  # when the rule's verdict began to disagree with its state


@dataclass
class Policy:
    """The owner's rules and their state. Feed it readings with :meth:`update`; it says whether to pause, and why.

    :param rules: the conditions; the worker is paused while any of them holds it.
    :param clock: monotonic seconds (``time.monotonic``, or a test's fake).
    :param pause_after: seconds a rule's objection must last before it pauses the worker: ignores spikes,
        at the cost of running that much longer on a busy machine.
    :param resume_after: seconds a rule must have no objection before it lets the worker resume: stops
        flapping, at the cost of idle time. This is the "resume after N idle minutes" of the owner.
    """

    rules: Sequence[Rule]
    clock: Callable[[], float]
    pause_after: float = 10.0
    resume_after: float = 60.0
    _states: dict[str, _RuleState] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.pause_after < 0 or self.resume_after < 0:
            raise ValueError("pause_after and resume_after must be >= 0 seconds")
        self._states = {rule.name: _RuleState() for rule in self.rules}

    @property
    def paused(self) -> bool:
        return any(state.paused for state in self._states.values())

    @property
    def reason(self) -> str:
        """Why the worker is paused ("" when it is not): the reasons of every rule that holds it."""
        return "; ".join(state.reason for state in self._states.values() if state.paused)

    def update(self, readings: Readings) -> bool:
        """Judge ``readings``; returns whether the worker should be paused now."""
        now = self.clock()
        for rule in self.rules:
            state = self._states[rule.name]
            objection = rule.judge(readings, state.paused)
            if (objection is not None) == state.paused:
                state.since = None
                if objection is not None:
                    state.reason = objection  # still paused: keep the figures in the reason current
                continue
            if state.since is None:
                state.since = now
            if now - state.since >= (self.resume_after if state.paused else self.pause_after):
                state.paused, state.reason, state.since = objection is not None, objection or "", None
        return self.paused
