"""Polling before sleeping (worker.polling): when it polls, when it sleeps, and that a local worker uses it."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

from foreman import protocol
from foreman.serialization import dumps_items
from worker import polling
from worker.config import WorkerConfig
from worker.executor import Executor, Outcome, WorkItem
from worker.worker import Worker


#: A window far above any scheduling delay of a loaded machine: the tests of the rule do not race the clock.
WINDOW = 0.2


class Waits:
    """A wait's two halves, recorded: ``ready`` (non-blocking) answers from a script, ``block`` sleeps."""

    def __init__(self, ready_after: int = 0, block_for: float = 0.0) -> None:
        self.polls = 0
        self.ready_after = ready_after  # ready() answers on this call (0: never)
        self.block_for = block_for
        self.blocked: list[float | None] = []

    def ready(self) -> bool:
        self.polls += 1
        return self.polls == self.ready_after

    def block(self, timeout: float | None) -> bool:
        self.blocked.append(timeout)
        if timeout is not None and timeout < self.block_for:
            time.sleep(timeout)
            return False
        time.sleep(self.block_for)
        return True


def test_a_short_wait_makes_the_next_one_poll_first() -> None:
    cadence = polling.Cadence(WINDOW)
    first = Waits()
    assert cadence.wait(first.ready, first.block) and first.polls == 0  # nothing known yet: it sleeps at once
    assert cadence.short

    second = Waits(ready_after=3)
    assert cadence.wait(second.ready, second.block)
    assert second.polls == 3 and second.blocked == []  # seen by polling, never slept
    assert cadence.short


def test_a_long_wait_turns_polling_off_until_a_wait_is_short_again() -> None:
    cadence = polling.Cadence(0.01)
    cadence.short = True
    slow = Waits(block_for=0.05)
    started = time.monotonic()
    assert cadence.wait(slow.ready, slow.block)
    assert slow.polls >= 1 and len(slow.blocked) == 1  # polled through the window, then slept
    assert time.monotonic() - started >= 0.01
    assert not cadence.short

    cadence.window = WINDOW
    after = Waits(ready_after=1)
    assert cadence.wait(after.ready, after.block)
    assert after.polls == 0 and after.blocked == [None]  # off: straight to sleep (which ended quickly)
    assert cadence.short


def test_a_timeout_within_the_window_leaves_the_cadence_alone() -> None:
    for short in (False, True):
        cadence = polling.Cadence(WINDOW)
        cadence.short = short
        waits = Waits(block_for=1.0)
        assert not cadence.wait(waits.ready, waits.block, timeout=0.01)
        assert cadence.short is short
        assert waits.blocked and waits.blocked[0] is not None and waits.blocked[0] <= 0.01


def test_a_timeout_past_the_window_ends_polling() -> None:
    cadence = polling.Cadence(0.01)
    cadence.short = True
    waits = Waits(block_for=1.0)
    assert not cadence.wait(waits.ready, waits.block, timeout=0.05)
    assert not cadence.short
    assert waits.blocked[0] is not None and waits.blocked[0] < 0.05  # the time spent polling counts


def test_no_polling_when_not_allowed() -> None:
    cadence = polling.Cadence(WINDOW)
    cadence.short = True
    waits = Waits(ready_after=1)
    assert cadence.wait(waits.ready, waits.block, may_poll=False)
    assert waits.polls == 0 and waits.blocked == [None]


class CountingCadence(polling.Cadence):
    """Counts the waits that polling answered."""

    polled = 0

    def wait(self, ready: Any, block: Any, timeout: float | None = None, may_poll: bool = True) -> Any:
        def counted() -> Any:
            got = ready()
            self.polled += bool(got)
            return got

        return super().wait(counted, block, timeout, may_poll)


def test_an_event_loop_on_the_polling_selector_serves_sockets_and_timers() -> None:
    selector = polling.PollingSelector(lambda: True)
    selector.cadence = cadence = CountingCadence(WINDOW)
    ours, theirs = socket.socketpair()

    def echo() -> None:  # a peer in another thread: each reply comes 2 ms later, while the loop waits in select
        while data := theirs.recv(100):
            time.sleep(0.002)
            theirs.sendall(data)

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        ours.setblocking(False)
        got = []
        for i in range(50):
            await loop.sock_sendall(ours, b"%d" % i)
            got.append(await loop.sock_recv(ours, 100))
        assert cadence.polled >= 45  # after the first reply, polling saw them (one slower than the window may not)
        started = time.monotonic()
        await asyncio.sleep(0.3)  # a timer: the selector returns at its time, with nothing
        assert time.monotonic() - started >= 0.3
        assert not cadence.short  # a wait longer than the window
        return got

    peer = threading.Thread(target=echo, daemon=True)
    peer.start()
    try:
        assert polling.run(main(), selector) == [b"%d" % i for i in range(50)]
    finally:
        ours.close()
        peer.join(5)
        theirs.close()


def test_run_cancels_what_is_left_and_closes_the_loop() -> None:
    left: list[asyncio.Task[None]] = []

    async def main() -> int:
        left.append(asyncio.ensure_future(asyncio.sleep(60)))
        return 7

    assert polling.run(main(), polling.PollingSelector(lambda: True)) == 7
    assert left[0].cancelled()


def test_only_a_worker_on_a_local_link_polls() -> None:
    assert Worker(WorkerConfig(foreman_url="unix:/tmp/foreman.sock", dashboard=False)).polls
    assert not Worker(WorkerConfig(foreman_url="ws://127.0.0.1:9000", dashboard=False)).polls


@pytest.mark.skipif(sys.platform == "win32", reason="task processes need POSIX")
def test_the_executor_allows_polling_only_around_short_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot whose last batch was short, or that just ended one, may reply soon; one running a long batch not.
    Task processes that poll run batches like any other, and leave when the worker closes their channel."""
    monkeypatch.setattr(polling, "WINDOW", 0.1)  # the worker's side of the rule, with room for a slow machine
    function = cloudpickle.dumps(time.sleep)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        executor = Executor(1, outcomes.put_nowait, loop, poll=True)
        executor.start()
        process = executor._slots[0].process
        try:
            assert not executor.may_reply_soon()  # nothing ran yet
            for job, seconds in enumerate([0.0, 0.0, 0.0, 0.5, 0.5]):
                executor.submit(WorkItem(job, 0, 1, "time.sleep", function, protocol.CALL_ONE,
                                         [dumps_items([seconds]).data], session=1))
                if job == 3:
                    assert executor.may_reply_soon()  # its previous batch was short
                if job == 4:
                    assert not executor.may_reply_soon()  # runs a batch after one of 0.5 s
                outcome = await outcomes.get()
                assert outcome.status == "ok", outcome.error
                assert executor.may_reply_soon()  # just ended one
                await asyncio.sleep(0.25)
                assert not executor.may_reply_soon()  # ended a while ago
        finally:
            executor.close()
        assert process.exitcode == 0  # it saw its channel close and left (close() kills one that does not)

    asyncio.run(main())
