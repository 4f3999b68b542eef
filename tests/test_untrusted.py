"""Results from workers the foreman does not trust: only plain data is ever unpickled."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import pickle
import threading

import pytest
from websockets.asyncio.client import connect

from foreman import Foreman, protocol
from foreman.errors import RemoteError, SerializationError
from foreman.protocol import Kind
from foreman.safe_pickle import register_safe_type, safe_loads
from tasks import CustomError, boom, square


class _Evil:
    """Unpickling this runs a shell command (what a malicious worker would send)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_plain_data_loads() -> None:
    value = {"a": [1, 2.5, "s", b"b", None, True], "t": (1, frozenset({2})), "d": datetime.date(2026, 1, 1),
             "dec": decimal.Decimal("1.5"), "r": range(3), "e": ValueError("x")}
    loaded = safe_loads(pickle.dumps(value))
    assert loaded["a"] == value["a"] and loaded["d"] == value["d"] and isinstance(loaded["e"], ValueError)


def test_code_is_refused_before_it_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(SerializationError, match=r"refused to load posix\.system"):
        safe_loads(pickle.dumps(_Evil(str(marker))))
    assert not marker.exists()
    with pytest.raises(SerializationError, match="refused to load builtins.eval"):
        safe_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")


def test_register_safe_type() -> None:
    data = pickle.dumps(Point(3))
    with pytest.raises(SerializationError, match="Point"):
        safe_loads(data)
    register_safe_type(Point.__module__, "Point")
    assert safe_loads(data).x == 3


@pytest.fixture
def untrusted():
    with Foreman(port=0, local_workers=1, trust_workers=False, heartbeat_interval=0.2,
                 heartbeat_timeout=1.5) as fm:
        fm.wait_for_workers(1)
        yield fm


def test_real_workers_still_work_in_untrusted_mode(untrusted: Foreman) -> None:
    assert untrusted.map(square, range(100)) == [x * x for x in range(100)]
    assert untrusted.submit(dict, a=1).result(timeout=30) == {"a": 1}
    assert isinstance(untrusted.submit(int, "x").exception(timeout=30), ValueError)  # built-in types rebuilt
    error = untrusted.submit(boom, 3).exception(timeout=30)
    assert isinstance(error, RemoteError) and not isinstance(error, CustomError)  # user types are not loaded
    assert error.type_name == "tasks.CustomError" and "raise CustomError" in error.remote_traceback


def test_a_result_of_an_unregistered_class_is_refused_with_its_name(untrusted: Foreman) -> None:
    def make_point(x: int) -> object:
        class Local:
            pass
        return Local()

    with pytest.raises(SerializationError, match="refused to load"):
        untrusted.map(make_point, [1])


def test_a_malicious_worker_cannot_run_code_on_the_foreman(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil_payload = pickle.dumps(([_Evil(str(marker))], {}))

    with Foreman(port=0, trust_workers=False, token="t", heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        async def malicious_worker() -> None:
            async with connect(fm.address) as ws:
                await ws.send(protocol.encode(Kind.HELLO, {
                    "protocol": protocol.PROTOCOL_VERSION, "worker_id": "mallory", "token": "t",
                    "python": ".".join(map(str, __import__("sys").version_info[:3])),
                    "cloudpickle": __import__("cloudpickle").__version__, "concurrency": 1, "capabilities": []}))
                while True:
                    msg = protocol.decode(await asyncio.wait_for(ws.recv(), 20))
                    if msg.kind is Kind.TASKS:
                        header = msg.header
                        await ws.send(protocol.encode(Kind.RESULTS, {
                            "job": header["job"], "start": header["start"], "count": header["count"],
                            "status": "ok", "elapsed": 0.001}, evil_payload))
                        await asyncio.sleep(0.5)
                        return

        thread = threading.Thread(target=asyncio.run, args=(malicious_worker(),))
        thread.start()
        error = fm.submit(square, 2).exception(timeout=30)
        thread.join(timeout=30)
    assert isinstance(error, SerializationError) and "posix.system" in str(error)
    assert not marker.exists()


def test_an_untrusted_worker_cannot_answer_for_a_batch_it_was_not_given() -> None:
    from foreman.scheduler import Scheduler
    from foreman.serialization import Pickled

    scheduler = Scheduler(lambda: 0.0)
    scheduler.add_worker("honest", 1, "env")
    scheduler.add_worker("mallory", 1, "env")
    job = scheduler.add_job("env")
    scheduler.add_batch(job.id, 0, 1, Pickled(pickle.dumps([1])))
    (assignment,) = scheduler.dispatch()
    other = "mallory" if assignment.worker_id == "honest" else "honest"
    assert scheduler.complete(other, job.id, 0, 1, holders_only=True) is None
    assert scheduler.complete(assignment.worker_id, job.id, 0, 1, holders_only=True) is not None
