"""The standalone foreman: a real ``python -m foreman`` process, real workers, clients over real WebSockets.

Remote map/submit/executor, roles and visibility, detached jobs fetched from another process, a foreman killed
with SIGKILL and restarted mid-job (exact results, no task executed twice), fair sharing between clients, a
client's connection cut silently, the asyncio API, the ``crowdcompute jobs`` CLI and JSON logs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from conftest import ROOT, start_worker, stop_process, wait_until, worker_env
from foreman import Foreman, protocol
from foreman.errors import AuthenticationError
from foreman.protocol import Kind
from service_tasks import executions, logged_square, nap_square
from tasks import CustomError, boom, square

TOKENS = """
[workers]
w = "worker-token-1"
[clients]
alice = "alice-token-1"
bob = "bob-token-12"
"""
ADMIN = "admin-token-1"


class Service:
    """A foreman service process on loopback with a token file and a data dir; restartable on the same port."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.tmp = tmp
        self.tokens = tmp / "tokens.toml"
        self.tokens.write_text(TOKENS)
        self.data = tmp / "data"
        self.extra = extra
        self.port = 0
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.stamps: list[tuple[float, str]] = []  # (monotonic time read, line): for timing reconnects
        self.ready_at = 0.0  # monotonic time of the last "foreman ready" line
        self.workers: list[subprocess.Popen[str]] = []

    @property
    def address(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Service:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "foreman", "--port", str(self.port), "--no-dashboard", "--token", ADMIN,
             "--token-file", str(self.tokens), "--data-dir", str(self.data), "--heartbeat-interval", "0.5",
             "--heartbeat-timeout", "10", *self.extra],
            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            found = re.search(r"foreman ready at ws://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self.ready_at = time.monotonic()
                break
        else:
            raise AssertionError("the foreman did not start:\n" + "".join(self.lines))
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()
        return self

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)
            self.stamps.append((time.monotonic(), line))

    def add_workers(self, n: int, *args: str) -> None:
        for index in range(n):
            self.workers.append(start_worker(self.address, "--token", "worker-token-1", "--concurrency", "1",
                                             "--no-dashboard", "--worker-id", f"w{len(self.workers)}-{index}",
                                             *args))

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def signal(self, sig: int) -> None:
        """Stop the foreman with ``sig`` (SIGINT, SIGTERM: graceful) and wait for it to exit."""
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=30)

    def joined_within(self, worker_ids: set[str], timeout: float) -> float:
        """Seconds from this run's "foreman ready" to the last of ``worker_ids`` joining it."""
        ready = self.ready_at

        def joined() -> dict[str, float]:
            return {m.group(1): at for at, line in list(self.stamps) if at >= ready
                    for m in [re.search(r"worker (\S+) joined", line)] if m}
        wait_until(lambda: worker_ids <= set(joined()), timeout=timeout)
        return max(joined()[w] for w in worker_ids) - ready

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path).start()
    svc.add_workers(2)
    yield svc
    svc.stop()


def connect(service: Service, token: str = "alice-token-1", **options) -> Foreman:
    fm = Foreman.connect(service.address, token=token, **options)
    wait_until(lambda: len(fm.workers) >= 2, timeout=60)
    return fm


def test_remote_client_has_the_embedded_api(service: Service) -> None:
    """map, imap_unordered, submit, options, the executor and remote exceptions work as embedded (a client that
    trusts the fleet's results, as this one says it does, gets the tasks' own exception types)."""
    with connect(service, trust_workers=True) as fm:
        assert fm.map(square, range(200)) == [x * x for x in range(200)]
        assert sorted(fm.imap_unordered(square, range(100))) == sorted(x * x for x in range(100))
        assert fm.submit(square, 12).result(timeout=30) == 144
        assert fm.options(priority=5).submit(square, 3).result(timeout=30) == 9
        with pytest.raises(CustomError, match="bad input 3") as info:
            fm.map(boom, range(6))
        assert "boom" in str(info.value.__cause__)  # the remote traceback travels with it
        with fm.executor() as pool:
            assert list(pool.map(square, range(10))) == [x * x for x in range(10)]
        assert fm.map(boom, range(5), return_exceptions=True)[3].__class__ is CustomError


def test_tokens_decide_who_connects_and_what_they_see(service: Service) -> None:
    """A worker token or a wrong token cannot connect as a client; clients see only their own jobs."""
    with pytest.raises(AuthenticationError, match="worker token"):
        Foreman.connect(service.address, token="worker-token-1")
    with pytest.raises(AuthenticationError, match="invalid token"):
        Foreman.connect(service.address, token="not-a-token")
    with connect(service) as alice, connect(service, "bob-token-12") as bob, connect(service, ADMIN) as admin:
        job = alice.submit_job(square, range(10))
        assert job.results(timeout=60) == [x * x for x in range(10)]
        assert [j["id"] for j in alice.jobs()] == [job.id]
        assert job.id not in [j["id"] for j in bob.jobs()]
        with pytest.raises(LookupError, match=f"no job {job.id} of yours"):
            bob.job(job.id)
        assert job.id in [j["id"] for j in admin.jobs()]
        assert admin.job(job.id).results(timeout=30) == [x * x for x in range(10)]


def test_detached_job_is_fetched_from_another_process(service: Service) -> None:
    """A script submits a detached job and exits; another process takes it up by id and reads its results."""
    script = ("import sys; from foreman import Foreman; from service_tasks import nap_square\n"
              f"fm = Foreman.connect({service.address!r}, token='alice-token-1')\n"
              "job = fm.submit_job(nap_square, range(60))\n"
              "print(job.id, flush=True); fm.close()\n")
    done = subprocess.run([sys.executable, "-c", script], env=worker_env(), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.split()[-1])
    with connect(service) as fm:
        job = fm.job(job_id)
        assert job.results(timeout=60) == [x * x for x in range(60)]
        assert job.state == "done" and job.progress == (60, 60)


def test_foreman_killed_mid_job_resumes_without_running_anything_twice(tmp_path: Path) -> None:
    """SIGKILL the foreman while a job runs, restart it on the same data dir: the client reconnects, the job
    finishes with exact results, and every task was executed exactly once (counted in a side-effect file).
    Speculative copies are off: they run a slow task twice on purpose."""
    service = Service(tmp_path, "--speculation", "0").start()
    log = str(tmp_path / "executions.log")
    try:
        service.add_workers(2)
        with connect(service, heartbeat_interval=0.3) as fm:
            job = fm.imap(logged_square, range(80), [log] * 80, [0.05] * 80)
            results = []
            for value in job:
                results.append(value)
                if len(results) == 20:
                    service.kill()
                    service.start()  # same port, same data dir
            assert results == [x * x for x in range(80)]
            assert sorted(executions(log)) == list(range(80))
            assert any("resumed from the journal" in line for line in service.lines)
            print("".join(line for line in service.lines if "held" in line or "resumed" in line))
    finally:
        service.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_foreman_stopped_gracefully_mid_job_runs_nothing_twice(tmp_path: Path, sig: int) -> None:
    """A graceful stop (Ctrl-C, SIGTERM) of the foreman mid-job is at least as safe as kill -9: the workers keep
    the batches they run and the results they hold, hand them in when it is back, and no task runs twice. They
    are back within a second of it listening again. Speculative copies are off (they run tasks twice on purpose)."""
    service = Service(tmp_path, "--speculation", "0").start()
    log = str(tmp_path / "executions.log")
    n = 240
    try:
        service.add_workers(2)
        with connect(service) as fm:
            job_id = fm.submit_job(logged_square, range(n), [log] * n, [0.05] * n).id
        wait_until(lambda: len(executions(log)) >= 40, timeout=60)
        service.signal(sig)
        assert service.process is not None and service.process.returncode == 0, "".join(service.lines[-20:])
        service.start()
        back = service.joined_within({"w0-0", "w1-1"}, timeout=30)
        with connect(service) as fm:
            assert fm.job(job_id).results(timeout=120) == [x * x for x in range(n)]
        ran = executions(log)
        repeated = sorted(x for x, c in collections.Counter(ran).items() if c > 1)
        assert sorted(set(ran)) == list(range(n))
        assert not repeated, f"{len(repeated)} tasks ran twice after a graceful stop: {repeated[:20]}\n" + "".join(service.lines[-40:])
        assert back < 1.0, f"the workers took {back:.2f}s to come back"
    finally:
        service.stop()


def test_detached_job_survives_a_foreman_restart(tmp_path: Path) -> None:
    """A detached job whose foreman is killed mid-way finishes after the restart; its results are all kept, and
    no task ran twice (speculative copies off, as above)."""
    service = Service(tmp_path, "--speculation", "0").start()
    log = str(tmp_path / "executions.log")
    try:
        service.add_workers(2)
        with connect(service) as fm:
            job_id = fm.submit_job(logged_square, range(60), [log] * 60, [0.05] * 60).id
        wait_until(lambda: len(executions(log)) >= 15, timeout=60)
        service.kill()
        service.start()
        with connect(service) as fm:
            assert fm.job(job_id).results(timeout=120) == [x * x for x in range(60)]
        assert sorted(executions(log)) == list(range(60))
    finally:
        service.stop()


def test_clients_share_the_fleet_by_owner(service: Service) -> None:
    """alice runs three jobs, bob (another process) one: bob gets about half the fleet, not a quarter. When bob's
    job is done, alice has done about as many tasks as he has (far fewer than the three-to-one a per-job share
    gives)."""
    script = ("import sys; from foreman import Foreman; from service_tasks import nap_square\n"
              f"fm = Foreman.connect({service.address!r}, token='bob-token-12')\n"
              "print('ready', flush=True); sys.stdin.readline()\n"
              "assert fm.map(nap_square, range(100), chunksize=2) == [x * x for x in range(100)]\n"
              "print('done', flush=True); fm.close()\n")
    bob = subprocess.Popen([sys.executable, "-c", script], env=worker_env(), cwd=ROOT, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert bob.stdin is not None and bob.stdout is not None
    try:
        assert bob.stdout.readline().strip() == "ready"
        with connect(service) as alice:
            alice_jobs = [alice.imap_unordered(nap_square, range(300), chunksize=2) for _ in range(3)]
            readers = [threading.Thread(target=_read_until_cancelled, args=(job,)) for job in alice_jobs]
            for reader in readers:
                reader.start()
            wait_until(lambda: sum(job.progress[0] for job in alice_jobs) > 0, timeout=60)
            bob.stdin.write("go\n")
            bob.stdin.flush()
            assert bob.stdout.readline().strip() == "done"
            alice_done = sum(job.progress[0] for job in alice_jobs)
            for job in alice_jobs:
                job.cancel()
            for reader in readers:
                reader.join(timeout=60)
        assert bob.wait(timeout=60) == 0
    finally:
        stop_process(bob)
    assert 40 <= alice_done <= 200, alice_done


def _read_until_cancelled(job: Iterator[int]) -> None:
    with contextlib.suppress(concurrent.futures.CancelledError):
        collections.deque(job, 0)


def test_a_client_cut_off_silently_reconnects_and_loses_nothing(service: Service) -> None:
    """The client's connection goes silent (a proxy drops every byte): its heartbeat notices, it reconnects
    through a fresh connection, resends unconfirmed input, and gets every result exactly once."""
    from chaos.proxy import LoopbackProxy

    with LoopbackProxy(service.port) as proxy, Foreman.connect(proxy.address, token="alice-token-1",
                                                               heartbeat_interval=0.2) as fm:
        wait_until(lambda: len(fm.workers) >= 2, timeout=60)
        job = fm.imap(nap_square, range(400), [0.005] * 400)
        results = []
        for value in job:
            results.append(value)
            if len(results) == 100:
                for pair in proxy.live_pairs():
                    proxy.cut(pair)
        assert results == [x * x for x in range(400)]
        assert len(proxy.live_pairs()) >= 1  # it came back through a new connection


@pytest.mark.asyncio
async def test_asyncio_api(service: Service) -> None:
    """amap, aimap (ordered and not) and asubmit from inside a running event loop."""
    async with Foreman.connect(service.address, token="alice-token-1", trust_workers=True) as fm:
        assert await fm.amap(square, range(50)) == [x * x for x in range(50)]
        assert [r async for r in fm.aimap(square, range(50))] == [x * x for x in range(50)]
        assert sorted([r async for r in fm.aimap(square, range(50), ordered=False)]) == [x * x for x in range(50)]
        assert await fm.asubmit(square, 9) == 81
        with pytest.raises(CustomError):
            async for _ in fm.aimap(boom, range(10)):
                pass


def test_jobs_cli_lists_shows_fetches_and_cancels(service: Service) -> None:
    with connect(service) as fm:
        finished = fm.submit_job(square, range(5))
        finished.wait(60)
        running = fm.submit_job(nap_square, range(400), [0.05] * 400)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "foreman.cli", "jobs", "--address", service.address,
                               "--token", "alice-token-1", *args], env=worker_env(), capture_output=True,
                              text=True, timeout=60, cwd=ROOT)

    listing = cli("list", "--json")
    assert listing.returncode == 0, listing.stderr
    states = {job["id"]: job["state"] for job in map(json.loads, listing.stdout.splitlines())}
    assert states == {finished.id: "done", running.id: "running"}
    assert json.loads(cli("show", str(finished.id)).stdout)["done"] == 5
    assert cli("results", str(finished.id)).stdout.split() == ["0", "1", "4", "9", "16"]
    assert cli("cancel", str(running.id)).returncode == 0
    with connect(service) as fm:
        wait_until(lambda: fm.job(running.id).state == "cancelled", timeout=30)
    missing = cli("show", "999")
    assert missing.returncode == 1 and "no job 999" in missing.stderr


def test_log_json_names_the_worker(tmp_path: Path) -> None:
    """--log-json writes one JSON object per line, with the worker id as a field of its own."""
    service = Service(tmp_path, "--log-json").start()
    try:
        service.add_workers(1)
        wait_until(lambda: any('"worker"' in line for line in service.lines), timeout=60)
        joined = [json.loads(line) for line in service.lines if line.startswith("{") and "joined" in line]
        assert joined and joined[0]["worker"] == "w0-0" and joined[0]["level"] == "INFO"
    finally:
        service.stop()


def test_embedded_foreman_keeps_detached_jobs(tmp_path: Path) -> None:
    """An embedded foreman with a data dir: submit_job, then fm.job(id) in the same process."""
    with Foreman(port=0, local_workers=2, dashboard=False, data_dir=str(tmp_path)) as fm:
        job = fm.submit_job(square, range(30))
        assert fm.job(job.id).results(timeout=60) == [x * x for x in range(30)]
        assert [j["id"] for j in fm.jobs(state="done")] == [job.id]
    assert (tmp_path / "journal.sqlite").exists()


def test_connecting_to_nothing_fails_clearly() -> None:
    with pytest.raises(ConnectionError, match="cannot reach the foreman"):
        Foreman.connect("ws://127.0.0.1:9", token="x")


class _FakeForeman:
    """A WebSocket server on loopback that answers each CONNECT with the next of ``welcomes`` and then hangs up
    after ``hold`` seconds."""

    def __init__(self, welcomes: list[dict[str, object]], hold: float = 3600.0) -> None:
        self.welcomes = [protocol.encode(Kind.WELCOME, {"session": "s", "heartbeat_interval": 1,
                                                         "heartbeat_timeout": 6, "max_message_size": 1 << 20,
                                                         **extra}) for extra in welcomes]
        self.hold = hold
        self._port: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return f"ws://127.0.0.1:{self._port.result(timeout=30)}"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _answer(self, ws: ServerConnection) -> None:
        assert protocol.decode(await ws.recv(), 1 << 20).kind is Kind.CONNECT
        await ws.send(self.welcomes.pop(0) if len(self.welcomes) > 1 else self.welcomes[0])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.wait_closed(), self.hold)

    async def _serve(self) -> None:
        async with serve(self._answer, "127.0.0.1", 0) as running:
            self._port.set_result(running.sockets[0].getsockname()[1])
            await asyncio.to_thread(self._stop.wait)


def _in_a_daemon_thread(call: Callable[[], object]) -> concurrent.futures.Future[object]:
    """Run ``call`` where a hang cannot keep the test run from ending."""
    outcome: concurrent.futures.Future[object] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return outcome


def test_a_welcome_the_client_cannot_use_fails_connect_instead_of_hanging_it() -> None:
    with _FakeForeman([{"capacity": "lots"}]) as address:  # capacity must be a number
        connecting = _in_a_daemon_thread(lambda: Foreman.connect(address, token="x"))
        with pytest.raises(ConnectionError, match="ValueError"):
            connecting.result(timeout=60)


def test_a_client_whose_connection_failed_for_good_refuses_new_jobs_instead_of_hanging_them() -> None:
    """The first connection works; the foreman hangs up and, on the reconnect, sends a WELCOME the client cannot
    use: a job started after that fails at once."""
    with _FakeForeman([{}, {"capacity": "lots"}], hold=0.5) as address:
        fm = Foreman.connect(address, token="x")
        try:
            wait_until(lambda: fm._backend._failed is not None, timeout=30)
            mapping = _in_a_daemon_thread(lambda: fm.map(square, range(3)))
            with pytest.raises(ConnectionError, match="has ended"):
                mapping.result(timeout=60)
        finally:
            fm.close()


def test_a_function_from_a_local_module_travels_by_value(service: Service, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's own module (not on the workers' path) is shipped with the function."""
    (tmp_path / "script_helpers.py").write_text("OFFSET = 1000\n\ndef shifted(x):\n    return x + OFFSET\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import script_helpers

    with connect(service) as fm:
        assert fm.map(script_helpers.shifted, range(5)) == [1000, 1001, 1002, 1003, 1004]


def test_credit_and_bans_survive_a_restart(tmp_path: Path) -> None:
    """The leaderboard and a ban are kept in the journal: a foreman restarted on the same data dir has them."""
    with Foreman(port=0, local_workers=1, dashboard=False, data_dir=str(tmp_path)) as fm:
        fm.wait_for_workers(1, timeout=60)
        assert fm.map(square, range(25)) == [x * x for x in range(25)]
        fm._call(fm._server.trust.ban, "stranger", "caught cheating")
        before = fm._call(fm._server.trust.ledger.leaderboard)
    assert before["volunteers"][0]["tasks"] == 25
    with Foreman(port=0, dashboard=False, data_dir=str(tmp_path)) as fm:
        assert fm._call(fm._server.trust.ledger.leaderboard) == before
        assert fm._call(fm._server.trust.reputation.to_json, "stranger")["state"] == "banned"


def test_remote_jobs_can_ask_for_redundancy_but_not_ship_a_comparator(service: Service) -> None:
    """redundancy and spot checks travel as JSON options (also kept in the journal); a comparator is code that
    would run in the foreman, so a client is told it cannot send one."""
    with connect(service) as fm:
        assert fm.map(square, range(30), redundancy=2) == [x * x for x in range(30)]
        assert fm.submit_job(square, range(10), redundancy=2).results(timeout=60) == [x * x for x in range(10)]
        with pytest.raises(ValueError, match="a comparator is code"):
            fm.map(square, range(3), redundancy=2, comparator=lambda a, b: a == b)


def test_a_detached_job_tells_returned_exceptions_from_raised_ones(tmp_path: Path) -> None:
    """results() raises a task's raised exception, and hands back an exception a task returned as its value."""
    with Foreman(port=0, local_workers=1, dashboard=False, data_dir=str(tmp_path)) as fm:
        returned = fm.submit_job(ValueError, ["a value, not an error"]).results(timeout=60)
        assert type(returned[0]) is ValueError and str(returned[0]) == "a value, not an error"
        with pytest.raises(CustomError, match="bad input 3"):
            fm.submit_job(boom, range(5)).results(timeout=60)
