"""Bugs the chaos suite found, each as a minimal, deterministic reproduction (fixed; kept as regression tests).

1. A CANCEL that races the end of its batch kills the worker's next batch. Found by the chaos job: even with no
fault injected, a worker now and then reports a batch ``crashed`` ("the task process was killed by SIGKILL"), and
the foreman gives that innocent batch a strike (counted in ``scheduler.reassigned``; the batch is requeued as a
suspect and runs alone, a multi-task batch is split at its second strike, a single task fails as poison at
``max_task_losses`` strikes). Tracing the foreman showed each such crash right after a CANCEL to that worker for
*another* batch: the losing copy of a speculated batch, cancelled because the other copy won.

Cause (worker/executor.py, ``Executor.stop_items`` and ``_Slot.kill``, when each slot had its own thread): the
running items to stop were picked under a lock, but ``slot.kill()`` ran after the lock was released and killed
whatever process the slot ran *then*. If the cancelled item finished in between (its result is sent anyway) and
the slot started its next item, the kill hit the next item, whose ``stop_reason`` was empty, so it was reported
``crashed``. The reproduction widens the window deterministically: the kill waits until the slot has moved on
to its next item. Since the executor runs on the worker's event loop (no slot threads), a slot cannot move on
while ``stop_items`` runs; the test is kept to hold that.

2. ``Foreman.close()`` waits for silent workers one after another. Found while working out the chaos job's
teardown: with workers frozen or cut off, ``ForemanServer.close()`` (foreman/server.py) awaits
``peer.ws.close(...)`` for each connected worker in turn, and each waits out the close handshake
(``close_timeout=2`` s) that a silent peer never answers, so closing takes about 2 s per silent worker (6 s for
3; over 3 minutes for a fleet of 100 unreachable volunteers).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from chaos.harness import WorkerFleet
from chaos.proxy import LoopbackProxy
from foreman import Foreman, protocol
from foreman.serialization import dumps_items
from worker.executor import Executor, WorkItem


def test_a_cancel_that_races_its_batch_s_end_does_not_kill_the_next_batch() -> None:
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    outcomes: dict[int, object] = {}
    executor = Executor(1, lambda outcome: outcomes.__setitem__(outcome.item.start, outcome), loop)

    def on_loop(fn: Callable[..., Any], *args: Any) -> Any:  # the executor runs on its event loop: call it there
        async def call() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    on_loop(executor.start)
    try:
        function = cloudpickle.dumps(time.sleep)
        digest = "time.sleep"

        def item(start: int, seconds: float) -> WorkItem:
            return WorkItem(job_id=1, start=start, count=1, digest=digest, function=function,
                            call=protocol.CALL_ONE, payload=[dumps_items([seconds]).data], session=1)

        first, second = item(0, 0.5), item(1, 3.0)
        on_loop(executor.submit, first)
        on_loop(executor.submit, second)
        deadline = time.monotonic() + 60  # the task process starts first (spawn)
        while (1, 0, 1) not in executor.running:
            assert time.monotonic() < deadline, "the first batch never started"
            time.sleep(0.005)

        slot = executor._slots[0]
        kill = slot.end

        def preempted_kill() -> None:
            """The CANCEL handler loses the CPU for a second between choosing the slot and killing its process
            (the slot must not be able to move on to its next batch meanwhile)."""
            slot.end = kill  # once
            until = time.monotonic() + 1
            while (1, 1, 1) not in executor.running and time.monotonic() < until:
                time.sleep(0.001)
            time.sleep(0.05)
            kill()

        slot.end = preempted_kill
        on_loop(executor.stop_items, protocol.STATUS_CANCELLED, 1, 0)  # CANCEL {job 1, start 0}: the first batch only

        deadline = time.monotonic() + 30
        while len(outcomes) < 2:
            assert time.monotonic() < deadline, f"outcomes so far: {outcomes}"
            time.sleep(0.01)
        assert outcomes[0].status in (protocol.STATUS_OK, protocol.STATUS_CANCELLED)
        # The second batch was never asked to stop: it must run to completion.
        assert outcomes[1].status == protocol.STATUS_OK, f"{outcomes[1].status}: {outcomes[1].error}"
    finally:
        on_loop(executor.close)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=10)
        loop.close()


def test_closing_the_foreman_does_not_wait_for_silent_workers_one_after_another(tmp_path) -> None:
    silent = 3
    fm = Foreman(port=0, local_workers=0, heartbeat_interval=0.2, heartbeat_timeout=30, dashboard=False)
    proxy = LoopbackProxy(fm._server.port).start()
    fleet = WorkerFleet(fm.address, proxy.address, tmp_path)
    try:
        for _ in range(silent):
            fleet.start(via_proxy=True)
        fm.wait_for_workers(silent, timeout=60)
        for pair in proxy.live_pairs():
            proxy.cut(pair)  # silent: neither side hears anything more (the foreman's timeout is 30 s)
        began = time.monotonic()
        fm.close()
        took = time.monotonic() - began
        assert took < 2.0 + 1.5, f"Foreman.close() took {took:.1f} s with {silent} silent workers"
    finally:
        fm.close()
        fleet.close()
        proxy.stop()
