"""A simulated fleet: many light workers per process, speaking the real protocol to a real foreman.

Each simulated worker is one WebSocket connection on a shared event loop. It sends the HELLO a real worker
sends (the fields :func:`foreman.server.describe_worker` reads), heartbeats at the interval the WELCOME gives,
and answers every TASKS with a real RESULTS message: the job's function is unpickled and applied in-process to
each argument, and the outcome pickled with :func:`foreman.serialization.dumps_results`, as
:mod:`worker.child` does. There are no task processes, so only trivial functions suit it; a task that must take
time is a coroutine function (:func:`slow_square`), awaited, so the loop stays free.

``python -m bench.simfleet ADDRESS --count N --prefix ID`` runs ``N`` simulated workers (``ID-0`` ... ``ID-{N-1}``,
one slot each) and prints ``ready N`` once all are welcomed; :class:`SimFleet` starts and kills such processes.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import pickle
import random
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from foreman import protocol
from foreman.addresses import split_token
from foreman.protocol import CALL_ONE, CALL_STAR, Kind
from foreman.serialization import ErrorEntry, dumps_results, error_entry, loads_items

ROOT = Path(__file__).resolve().parent.parent

#: Connections a simulated-fleet process opens at once: a burst larger than the foreman's listen backlog
#: (100 by default) would see SYNs dropped and retried a second later.
CONNECT_CONCURRENCY = 50

#: Attempts per connection before a simulated worker gives up (the process then exits non-zero).
CONNECT_ATTEMPTS = 5


def square(x: int) -> int:
    """A trivial task."""
    return x * x


async def slow_square(x: int, seconds: float = 0.3) -> int:
    """A task that takes ``seconds`` without holding the simulated worker's loop."""
    await asyncio.sleep(seconds)
    return x * x


class SimWorker:
    """One simulated worker: a connection, a heartbeat, and one slot that runs batches in order."""

    def __init__(self, worker_id: str, ws: ClientConnection, functions: dict[str, Callable[..., Any]]) -> None:
        self.worker_id = worker_id
        self.ws = ws
        self.functions = functions  # digest -> function, shared by the process's workers
        self.jobs: dict[int, tuple[str, str]] = {}  # job -> (digest, call style)
        self.queue: deque[tuple[int, int, int, list[bytes]]] = deque()
        self.ready = asyncio.Event()
        self.cancelled: set[int] = set()  # jobs whose remaining batches are dropped
        self.running: tuple[int, int, int] | None = None
        self.tasks_completed = 0

    async def serve(self, interval: float) -> None:
        runner = asyncio.create_task(self._run_batches())
        beats = asyncio.create_task(self._heartbeats(interval))
        try:
            async for data in self.ws:
                self._handle(protocol.decode(data))
        finally:
            runner.cancel()
            beats.cancel()

    def _handle(self, msg: protocol.Message) -> None:
        kind, header = msg.kind, msg.header
        if kind is Kind.JOB:
            digest = header["digest"]
            if digest not in self.functions:
                self.functions[digest] = pickle.loads(msg.payload)
            self.jobs[header["job"]] = (digest, header["call"])
            self.cancelled.discard(header["job"])
        elif kind is Kind.TASKS:
            parts = [bytes(part) for part in protocol.payload_parts(msg)]  # the pickle, then out-of-band buffers
            self.queue.append((header["job"], header["start"], header["count"], parts, header.get("framed") is True))
            self.ready.set()
        elif kind is Kind.CANCEL:
            start = header.get("start")
            self.queue = deque(b for b in self.queue if not (b[0] == header["job"] and start in (None, b[1])))
            if start is None:
                self.cancelled.add(header["job"])
        elif kind is Kind.JOB_DONE:
            self.jobs.pop(header["job"], None)
            self.cancelled.discard(header["job"])

    async def _run_batches(self) -> None:
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            job, start, count, payload, framed = self.queue.popleft()
            self.running = (job, start, count)
            digest, call = self.jobs[job]
            loop = asyncio.get_running_loop()
            began = loop.time()
            results, errors = await _apply(self.functions[digest], call, loads_items(payload[0], payload[1:], framed,
                                                                                   count))
            self.running = None
            if job in self.cancelled:
                continue
            self.tasks_completed += count - len(errors)
            header = {"job": job, "start": start, "count": count, "status": protocol.STATUS_OK,
                      "elapsed": loop.time() - began, "failed": len(errors)}
            if errors:
                header["errors"] = [[i, e[1], e[2][:300]] for i, e in list(errors.items())[:20]]
            await self.ws.send(protocol.encode(Kind.RESULTS, header, dumps_results(results, errors)))

    async def _heartbeats(self, interval: float) -> None:
        await asyncio.sleep(random.uniform(0, interval))  # a fleet started together must not beat in lockstep
        while True:
            status = {"status": "busy" if self.running else "idle", "running": int(self.running is not None),
                      "queued": len(self.queue), "tasks_completed": self.tasks_completed}
            await self.ws.send(protocol.encode(Kind.HEARTBEAT, status))
            await asyncio.sleep(interval)


async def _apply(fn: Callable[..., Any], call: str, items: list[Any]) -> tuple[list[Any], dict[int, ErrorEntry]]:
    results: list[Any] = []
    errors: dict[int, ErrorEntry] = {}
    for item in items:
        try:
            value = fn(item) if call == CALL_ONE else fn(*item) if call == CALL_STAR else fn(*item[0], **item[1])
            if inspect.isawaitable(value):
                value = await value
            results.append(value)
        except Exception as exc:  # noqa: BLE001 - a task's exception is its result
            errors[len(results)] = error_entry(exc)
            results.append(None)
    return results, errors


def hello(worker_id: str, token: str | None) -> dict[str, Any]:
    """The HELLO of a one-slot worker on a small machine, with the fields a real worker sends on its first
    connection (none of a previous foreman's work to declare)."""
    return {"protocol": protocol.PROTOCOL_VERSION, "worker_id": worker_id, "token": token,
            "python": ".".join(map(str, sys.version_info[:3])), "cloudpickle": cloudpickle.__version__,
            "concurrency": 1, "capabilities": [], "version": "sim", "dashboard": None, "hostname": "sim",
            "platform": sys.platform, "machine": "sim", "pid": os.getpid(), "cpu_count": 1, "memory": 2**30,
            "gpus": []}


async def _connect(address: str, worker_id: str, token: str | None,
                   gate: asyncio.Semaphore) -> tuple[ClientConnection, float]:
    """Open one connection and complete the handshake; returns it with the heartbeat interval."""
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            async with gate:
                ws = await connect(address, compression=None, ping_interval=None, open_timeout=30,
                                   close_timeout=1, max_size=protocol.DEFAULT_MAX_MESSAGE_SIZE)
                await ws.send(protocol.encode(Kind.HELLO, hello(worker_id, token)))
                welcome = protocol.decode(await asyncio.wait_for(ws.recv(), 30))
            if welcome.kind is not Kind.WELCOME:
                raise RuntimeError(f"{worker_id}: expected WELCOME, got {welcome.kind.name}")
            return ws, float(welcome.header["heartbeat_interval"])
        except (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidHandshake):  # refused when over the foreman's caps
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


async def run(address: str, count: int, prefix: str, token: str | None) -> None:
    """Connect ``count`` simulated workers, say ``ready``, and serve until the foreman closes them all."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    functions: dict[str, Callable[..., Any]] = {}
    connections = await asyncio.gather(*(_connect(address, f"{prefix}-{i}", token, gate) for i in range(count)))
    workers = [SimWorker(f"{prefix}-{i}", ws, functions) for i, (ws, _) in enumerate(connections)]
    print(f"ready {count}", flush=True)
    await asyncio.gather(*(w.serve(interval) for w, (_, interval) in zip(workers, connections)),
                         return_exceptions=True)


class SimFleet:
    """Processes of simulated workers dialling one foreman; each group is one process, killed or frozen whole."""

    def __init__(self, address: str, groups: dict[str, int], token: str | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if token is not None:
            env["CROWDCOMPUTE_TOKEN"] = token
        self.groups = dict(groups)
        self.processes = {
            prefix: subprocess.Popen([sys.executable, "-m", "bench.simfleet", address, "--count", str(count),
                                      "--prefix", prefix], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True)
            for prefix, count in groups.items()}

    def wait_ready(self) -> None:
        """Block until every process has its workers welcomed; RuntimeError if one fails instead."""
        for prefix, process in self.processes.items():
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            if line != f"ready {self.groups[prefix]}":
                raise RuntimeError(f"simulated group {prefix} did not connect (exit code {process.wait(30)})")

    def worker_ids(self, prefix: str) -> list[str]:
        return [f"{prefix}-{i}" for i in range(self.groups[prefix])]

    def kill(self, prefix: str) -> None:
        """The group vanishes with its sockets closed by the kernel (a crash, a killed process)."""
        self.processes[prefix].kill()

    def freeze(self, prefix: str) -> None:
        """The group falls silent with its sockets open (a machine off the network): only heartbeats tell."""
        self.processes[prefix].send_signal(signal.SIGSTOP)

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simfleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="the foreman's ws:// address")
    parser.add_argument("--count", type=int, required=True, help="simulated workers in this process")
    parser.add_argument("--prefix", required=True, help="worker ids are PREFIX-0, PREFIX-1, ...")
    args = parser.parse_args(argv)
    try:
        address, carried = split_token(args.address)  # a foreman that made up its token hands it in its address
        asyncio.run(run(address, args.count, args.prefix, os.environ.get("CROWDCOMPUTE_TOKEN") or carried))
    except (OSError, asyncio.TimeoutError, ConnectionClosed) as exc:
        print(f"simfleet {args.prefix}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
