"""A silent partition: the connection stays open on both sides but nothing passes. Only heartbeats can tell.

One worker dials the foreman through the loopback proxy, one dials it directly. Mid-job the proxy cuts the first
one's connection without a FIN or an RST, and holds any new connection it opens (so it cannot come back and be
noticed by reconnecting: the foreman's heartbeat timeout alone must find it). Asserted: the foreman declares it
lost, for silence, within ``heartbeat_timeout`` + 1 s; the worker's own watchdog drops its side too; the batches
it held finish on the other worker; every result arrives exactly once; once the partition heals the worker
rejoins and serves again.
"""

from __future__ import annotations

import threading
import time

import pytest

from chaos.harness import WorkerFleet
from chaos.proxy import LoopbackProxy
from foreman import Foreman
from tasks import slow_whoami, square

pytestmark = pytest.mark.slow  # chaos: silently cut links

HEARTBEAT_TIMEOUT = 1.5


def _wait(predicate, timeout: float, what: str, interval: float = 0.005) -> float:
    """Poll until ``predicate()``; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)
    return time.monotonic()


def test_a_silently_cut_worker_is_declared_lost_in_time_and_its_tasks_finish_elsewhere(tmp_path) -> None:
    n = 2_000
    with Foreman(port=0, local_workers=0, heartbeat_interval=0.2, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                 dashboard=False) as fm, LoopbackProxy(fm._server.port) as proxy:
        fleet = WorkerFleet(fm.address, proxy.address, tmp_path)
        try:
            cut_off = fleet.start("cut-off", via_proxy=True)
            direct = fleet.start("direct", via_proxy=False)
            fm.wait_for_workers(2, timeout=60)
            server, scheduler = fm._server, fm._server.scheduler

            box: dict = {}

            def consume() -> None:
                try:
                    box["results"] = fm.map(slow_whoami, range(n), timeout=120)
                except BaseException as exc:  # noqa: BLE001 - handed to the test
                    box["error"] = exc

            consumer = threading.Thread(target=consume)
            consumer.start()

            # Mid-job, with batches in flight on the worker behind the proxy: cut it off.
            _wait(lambda: fm._call(lambda: sum(j.tasks_done for j in scheduler.jobs.values())) >= 200, 60,
                  "200 tasks done")
            _wait(lambda: fm._call(lambda: bool(scheduler.workers["cut-off"].batches)), 30,
                  "the proxied worker holds a batch")
            peer, port = fm._call(lambda: (server.peers["cut-off"], server.peers["cut-off"].ws.remote_address[1]))
            pair = proxy.pair_for_upstream_port(port)
            assert pair is not None, "the proxied worker's connection is not in the proxy"
            proxy.set_hold_new(True)
            cut_at = proxy.cut(pair)
            cut_wall = time.time() - (time.monotonic() - cut_at)
            time.sleep(0.3)  # what was already on its way has arrived; from now on nothing from it arrives
            held = fm._call(lambda: sorted((b.start, b.count) for b in scheduler.workers["cut-off"].batches.values()))

            dropped_at = _wait(lambda: server.peers.get("cut-off") is not peer, HEARTBEAT_TIMEOUT + 10,
                               "the foreman drops the silent worker")
            record = fm._call(lambda: next(r for r in reversed(server.fleet.departed) if r.id == "cut-off"))
            detected = (record.left_at - cut_wall) if record.left_at else dropped_at - cut_at
            _wait(lambda: pair.down_gone_at is not None, HEARTBEAT_TIMEOUT + 10, "the worker's watchdog fires")
            worker_detected = pair.down_gone_at - cut_at
            print(f"\nSILENT CUT: foreman declared the worker lost {detected:.3f} s after the cut "
                  f"(polled: {dropped_at - cut_at:.3f} s; reason: {record.left_reason}); the worker's watchdog "
                  f"dropped its side after {worker_detected:.3f} s; it held batches {held}")

            assert "no heartbeat" in record.left_reason, record.left_reason
            assert detected < HEARTBEAT_TIMEOUT + 1.0
            assert worker_detected < HEARTBEAT_TIMEOUT + 1.0
            assert cut_off.alive, "the cut-off worker is partitioned, not dead"

            consumer.join(timeout=120)
            assert not consumer.is_alive(), "the job did not finish"
            assert "error" not in box, box.get("error")
            results = box["results"]
            assert [x for x, _ in results] == list(range(n))
            assert held, "the worker held no batch when it was cut"
            for start, count in held:  # its batches were finished by the other worker
                assert {pid for _, pid in results[start:start + count]} == {direct.pid}, (start, count)
            assert scheduler.workers_lost >= 1  # (a starved heartbeat of the other one would add one)
            assert scheduler.reassigned >= 1

            # The partition heals: the worker comes back (its held handshake is closed) and serves again.
            proxy.set_hold_new(False)
            proxy.close_cut()
            fm.wait_for_workers(2, timeout=30)
            assert fm.map(square, range(200), timeout=60) == [x * x for x in range(200)]
        finally:
            fleet.close()
