"""The owner's preferences at work: a loop that reads the machine, asks the :class:`~worker.policy.Policy`, and
pauses or resumes the worker; and the CPU cap's throttle. Started by :meth:`worker.Worker.run`."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from worker.policy import Policy, Sampler
from worker.sysinfo import cpu_count
from worker.throttle import Throttle, duty_for

if TYPE_CHECKING:
    from worker.worker import Worker

log = logging.getLogger("crowdcompute.worker")


def start(worker: Worker, sampler: Sampler | None) -> list[asyncio.Task[None]]:
    """Start what the worker's preferences ask for; ``sampler`` replaces the machine's readings (tests).

    RuntimeError if this machine cannot honour them (no POSIX signals for max_cpu). Without psutil, the rules that
    need its readings are skipped with one warning; the clock's (active hours) still apply.
    """
    prefs, executor = worker.config.prefs, worker.executor
    assert executor is not None
    throttle = None
    if prefs.max_cpu is not None:
        duty = duty_for(prefs.max_cpu, worker.config.max_concurrent_tasks, cpu_count())
        if duty < 1:
            throttle = Throttle(executor.task_pids, duty)
            log.info("max_cpu %g%%: task processes run %.0f%% of the time", prefs.max_cpu, duty * 100)
    if prefs.rules() and sampler is None:
        from worker import readings
        sampler = readings.MachineSampler()
        skipped = [readings.NEEDS_PSUTIL[rule.name] for rule in prefs.rules() if rule.name in readings.NEEDS_PSUTIL]
        if skipped and readings.psutil is None:
            log.warning("psutil is missing: skipping the rule(s) %s, which read the machine with it (pip install "
                        "psutil adds them)", ", ".join(f"--{name.replace('_', '-')}" for name in skipped))
    tasks: list[asyncio.Task[None]] = []  # created last: nothing is left running if the above raised
    if prefs.rules() and sampler is not None:
        tasks.append(asyncio.create_task(watch(worker, prefs.policy(), sampler, prefs.sample_interval)))
    if throttle is not None:
        tasks.append(asyncio.create_task(throttle.run()))
    return tasks


async def watch(worker: Worker, policy: Policy, sampler: Sampler, interval: float) -> None:
    """Every ``interval`` seconds: read, judge, and pause, resume or update the reason. Runs until cancelled."""
    while True:
        try:
            readings = await asyncio.to_thread(sampler.read)
        except Exception as exc:  # a sensor that fails now and then must not end the owner's rules
            log.warning("cannot read the machine for the pause rules: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(interval)
            continue
        if policy.update(readings):
            if policy.reason != worker.paused_reason:
                worker.pause(policy.reason)
        elif worker.paused_reason is not None:
            worker.resume()
        await asyncio.sleep(interval)
