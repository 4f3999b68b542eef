"""The volunteer's machine stays theirs: a worker steps aside while its owner types, and comes back after.

    python examples/volunteer_prefs.py

A foreman runs a job on one worker whose owner's preferences (a TOML file, as ``python -m worker --config
prefs.toml`` reads) say: pause when the keyboard was used in the last minute, resume after two idle minutes. Half
way through, the owner starts typing: the worker pauses, hands its running task back to the foreman (which keeps its
checkpoint), and the foreman's API shows why. When the owner stops, the worker resumes and the job finishes from
where it stopped.

The owner here is scripted (a ``Sampler`` the example drives), so the story runs the same on any machine; a real
worker reads the machine with psutil and, under X11, ``xprintidle``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from foreman import Foreman
from worker import Worker, WorkerConfig, checkpoint, last_checkpoint
from worker.policy import Readings
from worker.prefs import Prefs

PREFS_TOML = """\
min_user_idle = 60       # pause when the keyboard or mouse was used in the last minute
resume_user_idle = 120   # resume once they have been left alone for two minutes
pause_after = 0          # at once (default 10 s)
resume_after = 0         # the two idle minutes are the wait already (default 60 s)
pause_grace = 0.5        # running tasks get half a second, then go back to the foreman
sample_interval = 0.1    # read the machine ten times a second (default every 2 s)
"""


def count_to(n: int) -> tuple[int, int]:
    """Counts to ``n``, saving progress each step: (n, the step it resumed from)."""
    first = step = last_checkpoint() or 0
    while step < n:
        time.sleep(0.02)
        step += 1
        checkpoint(step)
    return step, first


class ScriptedOwner:
    """The owner's keyboard: ``typing`` makes its idle time 1 s; otherwise the clock runs on from when it stopped."""

    def __init__(self) -> None:
        self.typing = False
        self.left_at = time.monotonic() - 3600

    def type(self, typing: bool) -> None:
        self.typing = typing
        self.left_at = time.monotonic() - 120 if not typing else self.left_at  # fast-forward two idle minutes

    def read(self) -> Readings:
        idle = 1.0 if self.typing else time.monotonic() - self.left_at
        return Readings(datetime.datetime.now().time(), idle_seconds=idle)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prefs.toml"
        path.write_text(PREFS_TOML)
        prefs = Prefs.load(path)
    owner = ScriptedOwner()
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=2) as fm:
        worker = Worker(WorkerConfig(foreman_url=fm.address, worker_id="alice-laptop", max_concurrent_tasks=1,
                                     dashboard=False, prefs=prefs), sampler=owner)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
        thread.start()
        fm.wait_for_workers(1)
        api = f"{fm.dashboard_url}api/workers/alice-laptop"

        future = fm.submit(count_to, 200)
        wait_for(lambda: worker.executor is not None and worker.executor.busy, "the task to start")
        time.sleep(1)  # about half way
        owner.type(True)
        print("the owner starts typing")
        wait_for(lambda: get_json(api)["status"] == "paused", "the foreman to see the pause")
        print(f"worker paused: {get_json(api)['pause_reason']}")
        wait_for(lambda: worker.executor is not None and not worker.executor.busy, "the task to be handed back")
        print("its running task went back to the foreman, with its checkpoint")

        owner.type(False)
        print("the owner stops typing")
        wait_for(lambda: get_json(api)["status"] != "paused", "the resume")
        print(f"worker resumed: {get_json(api)['status']}")
        steps, first = future.result(timeout=60)
        print(f"the task counted to {steps}, resuming from step {first} rather than from 0")

        loop.call_soon_threadsafe(worker.stop)
        thread.join(timeout=20)


if __name__ == "__main__":
    main()
