"""Attacks on the wire, each run on loopback against real foremen, workers and clients, and shown to fail.

Who attacks whom (see docs/security.md's threat model):

- a client token holder -> the foreman process: an argument that runs code when unpickled (never unpickled there);
- a client -> another client's tasks: a function submitted under someone else's digest;
- an untrusted worker -> the foreman's event loop: a result that is a memory bomb, or slow to load;
- an untrusted worker -> other workers: a crafted CHECKPOINT relayed to the next worker of the task;
- a foreman (or a man in the middle of ``ws://``) -> a client: a WELCOME that claims trust, then a poisoned OUTPUT;
- task code -> the foreman: the local workers' secret read from the worker's environment or command line;
- an old worker -> a foreman of a newer protocol: refused with a reason that says to upgrade;
- a power loss -> a client: result sequence numbers reused after the journal lost its last commits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pickle
import re
import shutil
import sqlite3
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from conftest import start_worker, stop_process, wait_until
from foreman import Foreman, protocol
from foreman.checkpoints import Checkpoints
from foreman.errors import SerializationError
from foreman.jobs import JobOptions, placement_to_json
from foreman.journal import Journal
from foreman.protocol import CloseCode, Kind
from foreman.safe_pickle import register_safe_type, safe_loads
from foreman.serialization import dumps_framed, dumps_function, dumps_results
from foreman.stored import StoredJob
from tasks import square
from test_service import ADMIN, Service

WORKER_TOKENS = '[workers]\nw = "worker-token-1"\n'
PYTHON = ".".join(map(str, sys.version_info[:3]))


class Detonator:
    """Unpickling this records which process did it (a file named by its pid), then, with ``exit``, kills that
    process: a task process that loads it dies; a foreman that loaded it would die too."""

    def __init__(self, marks: Path, exit: bool = True) -> None:
        self.marks, self.exit = str(marks), exit

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"import os, pathlib; pathlib.Path({self.marks!r}, str(os.getpid())).touch()"
        return (exec, (code + ("; os._exit(13)" if self.exit else ""),))


@pytest.fixture(autouse=True)
def _modules_stay_by_reference() -> Any:
    """``Foreman.connect`` ships a local module's functions by value from then on (``ship_by_value``); these tests
    put that back, so that later tests in the session still see tracebacks with source lines."""
    import tasks as tasks_module

    modules = [tasks_module, sys.modules[__name__]]
    before = [cloudpickle.cloudpickle._is_registered_pickle_by_value(m) for m in modules]
    yield
    for module, was in zip(modules, before):
        if not was and cloudpickle.cloudpickle._is_registered_pickle_by_value(module):
            cloudpickle.unregister_pickle_by_value(module)


def _marks(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def in_thread(make: Callable[[], Awaitable[Any]]) -> concurrent.futures.Future[Any]:
    """Run a coroutine on its own loop in a daemon thread (the foreman's API blocks the test's thread)."""
    outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome.set_result(asyncio.run(make()))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return outcome


async def hand_worker(address: str, answer: Callable[[ClientConnection, protocol.Message], Awaitable[bool]],
                      token: str = "worker-token-1", worker_id: str = "hand") -> None:
    """A worker made by hand over a real WebSocket: HELLO, then ``answer`` every message until it returns False."""
    async with connect(address, compression=None, max_size=None, ping_interval=None) as ws:
        await ws.send(protocol.encode(Kind.HELLO, {
            "protocol": protocol.PROTOCOL_VERSION, "worker_id": worker_id, "token": token, "python": PYTHON,
            "cloudpickle": cloudpickle.__version__, "concurrency": 1, "capabilities": []}))
        assert protocol.decode(await ws.recv()).kind is Kind.WELCOME
        async for data in ws:
            if not await answer(ws, protocol.decode(data)):
                return


# -- 1. a client's arguments are never unpickled by the foreman ---------------------------------------------------


def test_a_clients_argument_that_runs_code_is_never_unpickled_by_the_foreman(tmp_path: Path) -> None:
    """A client token holder sends an argument whose unpickling kills the task process, so that its batch loses
    two workers and is split; the foreman splits it by its per-task frames and never loads it: the foreman lives,
    the other tasks of the batch succeed, the poisoned one fails as poison."""
    marks = tmp_path / "marks"
    marks.mkdir()
    service = Service(tmp_path).start()
    try:
        service.add_workers(1)
        with Foreman.connect(service.address, token="alice-token-1") as fm:
            wait_until(lambda: len(fm.workers) >= 1, timeout=60)
            out = fm.map(square, [1, 2, Detonator(marks), 4], chunksize=4, return_exceptions=True, timeout=120)
        assert out[0] == 1 and out[1] == 4 and out[3] == 16
        assert isinstance(out[2], Exception) and "poison" in str(out[2])
        assert service.process is not None and service.process.poll() is None
        assert str(service.process.pid) not in _marks(marks)
        assert len(_marks(marks)) >= 3  # the task processes did load it: the attack was made
    finally:
        service.stop()


def test_a_framed_batch_splits_into_its_slices_without_being_unpickled(tmp_path: Path) -> None:
    """The scheduler's split, as a pure call: each task's slice as it came, nothing loaded."""
    from foreman.serialization import loads_items, split_payload

    marks = tmp_path / "marks"
    marks.mkdir()
    batch = dumps_framed([1, Detonator(marks, exit=False), "three"])
    singles = split_payload(batch, 3)
    assert not _marks(marks) and all(single.framed for single in singles)
    assert loads_items(singles[2].data, (), True, 1) == ["three"]
    with pytest.raises(ValueError, match="adds up"):
        split_payload(batch._replace(data=batch.data + b"x"), 3)


def test_a_worker_of_the_old_protocol_is_told_to_upgrade() -> None:
    """A HELLO of protocol 3 (arguments not framed per task) is refused with 4002 and a reason for its owner
    (under 120 characters: a close reason's limit)."""
    with Foreman(port=0, token=ADMIN, dashboard=False) as fm:
        async def old_hello() -> tuple[int, str]:
            async with connect(fm.address) as ws:
                await ws.send(protocol.encode(Kind.HELLO, {
                    "protocol": 3, "worker_id": "old", "token": ADMIN, "python": PYTHON,
                    "cloudpickle": cloudpickle.__version__, "concurrency": 1, "capabilities": []}))
                try:
                    await ws.recv()
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    return exc.rcvd.code, exc.rcvd.reason
                raise AssertionError("an old worker was answered")

        code, reason = asyncio.run(old_hello())
    assert code == CloseCode.VERSION_MISMATCH
    assert reason == (f"protocol 3 refused, the foreman speaks protocol {protocol.PROTOCOL_VERSION}: "
                      "upgrade CrowdCompute on this worker")
    assert code in protocol.FATAL_CLOSE_CODES  # the worker stops and says so, rather than retrying


# -- 2. untrusted results: bounded, and never decoded on the event loop ----------------------------------------------

#: 43 and 30 bytes that would make the restricted loader allocate 800 MB and 100 MB.
BOMBS = [b"\x80\x05cbuiltins\nlist\ncbuiltins\nrange\nJ\x00\xe1\xf5\x05\x85R\x85R.",
         b"\x80\x05cbuiltins\nbytearray\nJ\x00\xe1\xf5\x05\x85R."]


@pytest.mark.parametrize("bomb", BOMBS, ids=["list-of-range", "bytearray"])
def test_a_small_result_cannot_make_the_restricted_loader_allocate_much(bomb: bytes) -> None:
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(SerializationError, match="refused to build"):
            safe_loads(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - began < 1.0
    assert peak < 4 * 1024 * 1024


def test_the_restricted_loader_still_loads_large_honest_data() -> None:
    value = {"ints": list(range(200_000)), "blob": bytearray(3_000_000), "text": "x" * 1_000_000}
    assert safe_loads(pickle.dumps(value, protocol=5)) == value


_loaded_on: list[str] = []


def record_thread() -> str:
    """Registered as a safe type below: what a result calls when loaded, to show on which thread it was."""
    _loaded_on.append(threading.current_thread().name)
    return "probed"


class _Probe:
    def __reduce__(self) -> tuple[Any, ...]:
        return (record_thread, ())


def test_an_untrusted_workers_result_is_decoded_off_the_event_loop(tmp_path: Path) -> None:
    """An untrusting foreman's ``submit`` results from a stranger's worker load on another thread than the
    foreman's event loop, and a memory bomb among them fails that call only."""
    register_safe_type(record_thread.__module__, "record_thread")
    (tmp_path / "tokens.toml").write_text(WORKER_TOKENS)
    payloads = [dumps_results([_Probe()], {}), BOMBS[0]]

    async def answer(ws: ClientConnection, msg: protocol.Message) -> bool:
        if msg.kind is Kind.TASKS:
            await ws.send(protocol.encode(Kind.RESULTS, {
                "job": msg.header["job"], "start": msg.header["start"], "count": msg.header["count"],
                "status": "ok", "elapsed": 0.01, "failed": 0}, payloads.pop(0)))
        return bool(payloads)

    with Foreman(port=0, token=ADMIN, token_file=str(tmp_path / "tokens.toml"), trust_workers=False,
                 dashboard=False) as fm:
        worker = in_thread(lambda: hand_worker(fm.address, answer))
        wait_until(lambda: len(fm.workers) == 1)
        assert fm.submit(square, 1).result(timeout=30) == "probed"
        with pytest.raises(SerializationError, match="refused to build"):
            fm.submit(square, 2).result(timeout=30)
        worker.result(timeout=30)
    assert _loaded_on and all(name != "crowdcompute-foreman" for name in _loaded_on)


def test_replicas_from_untrusted_workers_are_compared_after_decoding_off_the_event_loop(tmp_path: Path) -> None:
    """A validated job's replicas from strangers' workers are loaded off the loop too, then compared."""
    register_safe_type(record_thread.__module__, "record_thread")
    (tmp_path / "tokens.toml").write_text(WORKER_TOKENS)
    _loaded_on.clear()

    async def answer(ws: ClientConnection, msg: protocol.Message) -> bool:
        if msg.kind is Kind.TASKS:
            await ws.send(protocol.encode(Kind.RESULTS, {
                "job": msg.header["job"], "start": msg.header["start"], "count": msg.header["count"],
                "status": "ok", "elapsed": 0.01, "failed": 0}, dumps_results([_Probe()], {})))
            return False
        return True

    with Foreman(port=0, token=ADMIN, token_file=str(tmp_path / "tokens.toml"), trust_workers=False,
                 dashboard=False) as fm:
        workers = [in_thread(lambda name=name: hand_worker(fm.address, answer, worker_id=name))
                   for name in ("hand-1", "hand-2")]
        wait_until(lambda: len(fm.workers) == 2)
        assert fm.map(square, [1], redundancy=2, chunksize=1, timeout=60) == ["probed"]
        for worker in workers:
            worker.result(timeout=30)
    assert len(_loaded_on) >= 2 and all(name != "crowdcompute-foreman" for name in _loaded_on)


# -- 3. an untrusted worker's checkpoint never reaches another worker ------------------------------------------------


def resumed_from(x: int) -> str:
    """A task that says what it resumed from."""
    from worker import last_checkpoint

    return repr(last_checkpoint())


def test_a_checkpoint_from_an_untrusted_worker_is_not_relayed(tmp_path: Path) -> None:
    """A stranger's worker sends a crafted CHECKPOINT for the task it holds and vanishes; the next worker of the
    task starts it from scratch, and nothing of the checkpoint runs anywhere."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "tokens.toml").write_text(WORKER_TOKENS)

    async def answer(ws: ClientConnection, msg: protocol.Message) -> bool:
        if msg.kind is Kind.TASKS:
            await ws.send(protocol.encode(Kind.CHECKPOINT, {"job": msg.header["job"], "task": msg.header["start"]},
                                          cloudpickle.dumps(Detonator(marks, exit=False))))
            await ws.send(protocol.encode(Kind.HEARTBEAT, {"status": "busy"}))  # the CHECKPOINT is read first
            await asyncio.sleep(0.5)
            ws.transport.abort()  # lost, not a clean leave: the task runs again elsewhere
            return False
        return True

    with Foreman(port=0, token=ADMIN, token_file=str(tmp_path / "tokens.toml"), trust_workers=False,
                 dashboard=False, heartbeat_interval=0.2, heartbeat_timeout=5) as fm:
        attacker = in_thread(lambda: hand_worker(fm.address, answer))
        wait_until(lambda: len(fm.workers) == 1)
        result = fm.submit(resumed_from, 1)
        attacker.result(timeout=30)
        honest = start_worker(fm.address, "--token", "worker-token-1", "--concurrency", "1", "--no-dashboard")
        try:
            assert result.result(timeout=60) == "None"  # restarted from scratch
        finally:
            stop_process(honest)
    assert not _marks(marks)


def test_checkpoints_held_are_bounded_per_worker_and_in_all() -> None:
    store = Checkpoints(per_worker=100, total=150)
    assert store.keep("a", 1, 0, b"x" * 60) and store.keep("a", 1, 0, b"x" * 90)  # replaces its own: 90 held
    assert not store.keep("a", 1, 1, b"x" * 20)  # 110 > 100 for worker a
    assert store.keep("b", 1, 2, b"x" * 60) and not store.keep("c", 1, 3, b"x" * 10)  # 160 > 150 in all
    assert store.held == 150
    store.drop(1, 0, 1)
    assert store.held == 60 and store.keep("a", 1, 1, b"x" * 90) and set(store.of_job(1)) == {1, 2}
    store.drop_job(1)
    assert store.held == 0 and not store.of_job(1)


# -- 4. a client cannot put its function in place of another's ----------------------------------------------------


def test_a_function_submitted_under_another_clients_digest_does_not_replace_it(tmp_path: Path) -> None:
    """Bob submits his own function under the digest of Alice's (anyone can compute it), so that the worker's
    cache, keyed by digest, would hand his code Alice's tasks; the foreman computes digests itself."""
    service = Service(tmp_path).start()
    try:
        service.add_workers(1)  # one task process: the cache Bob aims at is the one Alice's tasks use
        alices_digest, _ = dumps_function(square)

        async def bob() -> list[bytes]:
            async with connect(service.address, max_size=None) as ws:
                await ws.send(protocol.encode(Kind.CONNECT, {
                    "protocol": protocol.PROTOCOL_VERSION, "client": "bob-1", "token": "bob-token-12",
                    "python": PYTHON, "cloudpickle": cloudpickle.__version__}))
                assert protocol.decode(await ws.recv()).kind is Kind.WELCOME
                await ws.send(protocol.encode(Kind.SUBMIT, {
                    "ref": -1, "name": "square", "digest": alices_digest, "call": protocol.CALL_ONE,
                    "detached": False, "options": placement_to_json(JobOptions().placement()), "total": 3},
                    cloudpickle.dumps(lambda x: "bob was here", protocol=5)))
                accepted = protocol.decode(await ws.recv())
                job = accepted.header["job"]
                await ws.send(protocol.encode(Kind.INPUT, {"job": job, "start": 0, "count": 3},
                                              dumps_framed([1, 2, 3]).data))
                await ws.send(protocol.encode(Kind.INPUT_END, {"job": job}))
                outputs = []
                while True:
                    msg = protocol.decode(await ws.recv(), 1 << 30)
                    if msg.kind is Kind.OUTPUT:
                        outputs.append(bytes(msg.payload))
                    elif msg.kind is Kind.JOB_END:
                        return outputs

        bobs = in_thread(bob).result(timeout=60)
        assert bobs and all(b"bob was here" in payload for payload in bobs)  # his own job ran his function
        with Foreman.connect(service.address, token="alice-token-1") as fm:
            assert fm.map(square, range(6), timeout=60) == [x * x for x in range(6)]
    finally:
        service.stop()


# -- 5. the client chooses its own trust policy ---------------------------------------------------------------------


def test_a_welcome_claiming_trust_does_not_make_the_client_unpickle_code(tmp_path: Path) -> None:
    """A fake foreman (or a man in the middle of ws://) says trust_workers in its WELCOME, then sends a result
    that runs code when fully unpickled: the client loads it with the restricted loader and refuses it."""
    marks = tmp_path / "marks"
    marks.mkdir()
    poisoned = pickle.dumps(([Detonator(marks, exit=False)], {}), protocol=5)

    async def fake_foreman(ws: ServerConnection) -> None:
        assert protocol.decode(await ws.recv()).kind is Kind.CONNECT
        await ws.send(protocol.encode(Kind.WELCOME, {
            "session": "fake", "heartbeat_interval": 5, "heartbeat_timeout": 30, "max_message_size": 1 << 20,
            "principal": "alice", "admin": False, "trust_workers": True, "capacity": 1, "slots": 1}))
        async for data in ws:
            msg = protocol.decode(data, 1 << 20)
            if msg.kind is Kind.SUBMIT:
                await ws.send(protocol.encode(Kind.ACCEPTED, {"ref": msg.header["ref"], "job": 1}))
            elif msg.kind is Kind.INPUT:
                await ws.send(protocol.encode(Kind.OUTPUT, {"job": 1, "seq": 1, "start": 0, "count": 1,
                                                            "status": "ok", "fed": 1}, poisoned))
                await ws.send(protocol.encode(Kind.JOB_END, {"job": 1, "state": "done"}))

    port: concurrent.futures.Future[int] = concurrent.futures.Future()
    stop = threading.Event()

    async def serve_fake() -> None:
        async with serve(fake_foreman, "127.0.0.1", 0) as server:
            port.set_result(server.sockets[0].getsockname()[1])
            await asyncio.to_thread(stop.wait)

    served = in_thread(serve_fake)
    try:
        with Foreman.connect(f"ws://127.0.0.1:{port.result(timeout=30)}", token="x") as fm:
            with pytest.raises(SerializationError, match="refused to load builtins.exec"):
                fm.map(square, [1], timeout=30)
    finally:
        stop.set()
        served.result(timeout=30)
    assert not _marks(marks)


# -- 6. task code cannot obtain the local workers' secret --------------------------------------------------------

_TOKEN_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32}(?![A-Za-z0-9_-])")  # secrets.token_urlsafe(24)


def snoop(_: int) -> list[str]:
    """Task code looking for a credential where its worker keeps one: its environment, the worker's command
    line, environment and standard input."""
    found = list(os.environ.values())
    parent = os.getppid()
    for name in ("cmdline", "environ"):
        try:
            found.append(Path(f"/proc/{parent}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    try:
        fd = os.open(f"/proc/{parent}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
        try:
            found.append(os.read(fd, 4096).decode(errors="replace"))
        finally:
            os.close(fd)
    except OSError:
        pass
    return sorted({token for text in found for token in _TOKEN_SHAPE.findall(text)})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_task_code_cannot_find_the_local_workers_secret() -> None:
    """Whatever a task finds in its environment, or its worker's /proc entries, joins the foreman over TCP as
    nothing: each candidate HELLO is refused."""
    with Foreman(port=0, token=ADMIN, local_workers=1, dashboard=False) as fm:
        fm.wait_for_workers(1, timeout=60)
        candidates = fm.submit(snoop, 0).result(timeout=60)

        async def try_token(token: str) -> Kind | int:
            async with connect(fm.address) as ws:
                await ws.send(protocol.encode(Kind.HELLO, {
                    "protocol": protocol.PROTOCOL_VERSION, "worker_id": "thief", "token": token, "python": PYTHON,
                    "cloudpickle": cloudpickle.__version__, "concurrency": 1, "capabilities": []}))
                try:
                    return protocol.decode(await ws.recv()).kind
                except ConnectionClosed as exc:
                    return exc.rcvd.code if exc.rcvd is not None else 1006

        answers = {token: asyncio.run(try_token(token)) for token in candidates}
    assert all(answer != Kind.WELCOME for answer in answers.values()), answers


# -- 7. result numbers survive a power loss ---------------------------------------------------------------------------


def test_result_numbers_after_a_power_loss_are_never_ones_a_client_already_has(tmp_path: Path) -> None:
    """The journal's last commits (results a client already received, with their sequence numbers) are lost
    with the machine's power; the results computed again get numbers above those the client has, so the client,
    which drops any number it has seen, takes them."""
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    journal.add_job(1, "alice", "f", "digest", protocol.CALL_ONE, b"function", {}, 3, False)
    row = journal.job(1)
    assert row is not None
    stored = StoredJob(row, journal)
    stored.deliver(0, 1, b"result 0", 0.1, "w")
    on_disk = sqlite3.connect(tmp_path / "disk.sqlite")
    journal.db.backup(on_disk)  # what had reached the disk when the power went
    on_disk.close()
    stored.deliver(1, 1, b"result 1", 0.1, "w")  # sent to the client, not yet on the disk
    client_has = max(output.seq for output in journal.outputs(1, 0))
    journal.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "disk.sqlite", path)

    again = Journal(path)
    row = again.job(1)
    assert row is not None
    StoredJob(row, again).deliver(1, 1, b"result 1, computed again", 0.1, "w")
    assert [output.payload for output in again.outputs(1, client_has)] == [b"result 1, computed again"]
    again.close()


def test_input_journaled_by_an_older_foreman_fails_clearly_and_is_never_unpickled(tmp_path: Path) -> None:
    """A journal written before arguments were framed holds one pickle per batch: the upgraded foreman resumes the
    job without loading it (it might be a client's bomb) and fails those tasks with a reason."""
    marks = tmp_path / "marks"
    marks.mkdir()
    journal = Journal(tmp_path / "journal.sqlite")
    _, function = dumps_function(square)
    journal.add_job(1, "admin", "square", "digest", protocol.CALL_ONE, function, {}, 2, True)
    journal.add_input(1, 0, 2, pickle.dumps([Detonator(marks, exit=False), 2], protocol=5))
    journal.close_input(1)
    journal.close()
    with Foreman(port=0, token=ADMIN, local_workers=1, dashboard=False, data_dir=str(tmp_path)) as fm:
        results = fm.job(1).results(timeout=60, return_exceptions=True)
    assert all(isinstance(r, SerializationError) and "submit the job again" in str(r) for r in results)
    assert len(results) == 2 and not _marks(marks)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_given_its_token_on_stdin_keeps_it_across_a_hard_restart_and_shows_it_nowhere(
        tmp_path: Path) -> None:
    """``--token-stdin``: the token is in neither the worker's command line nor its environment, and a hard
    restart (the process re-executes itself) hands it over again through a fresh pipe."""
    import subprocess

    import httpx

    from conftest import worker_env

    (tmp_path / "tokens.toml").write_text(WORKER_TOKENS)
    with Foreman(port=0, token=ADMIN, token_file=str(tmp_path / "tokens.toml")) as fm:
        process = subprocess.Popen([sys.executable, "-m", "worker", fm.address, "--token-stdin", "--no-dashboard",
                                    "--concurrency", "1", "--worker-id", "piped", "--log-level", "WARNING"],
                                   env=worker_env(CROWDCOMPUTE_TOKEN="worker-token-1"), stdin=subprocess.PIPE)
        try:
            assert process.stdin is not None
            process.stdin.write(b"worker-token-1\n")
            process.stdin.close()
            fm.wait_for_workers(1, timeout=60)
            proc = Path(f"/proc/{process.pid}")
            assert b"worker-token-1" not in (proc / "cmdline").read_bytes()
            assert fm.workers == ["piped"], fm.workers
            response = httpx.post(f"{fm.dashboard_url}api/workers/piped/restart", params={"hard": "true"},
                                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
            assert response.status_code < 300
            wait_until(lambda: b"worker-token-1" not in (proc / "environ").read_bytes()
                       and "piped" in fm.workers and fm.map(square, range(5), timeout=30) == [0, 1, 4, 9, 16],
                       timeout=60, interval=0.5)
            assert process.poll() is None
        finally:
            stop_process(process)
