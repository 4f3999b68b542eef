"""Large bytes arguments travel out of band: beside the pickle, not copied into it, and arrive as they were sent."""

from __future__ import annotations

import pickle
from pathlib import Path

from tasks import describe_buffers, same_object

from foreman import Foreman
from foreman.serialization import (
    OUT_OF_BAND_BYTES,
    dumps_items,
    loads_items,
    split_payload,
)

BIG = OUT_OF_BAND_BYTES


def test_large_bytes_and_bytearray_leave_the_pickle_and_come_back_as_themselves() -> None:
    big, mutable, small = b"a" * BIG, bytearray(b"b" * (2 * BIG)), b"c" * 100
    payload = dumps_items([big, (mutable, small), {"again": big}])
    assert payload.buffers == (big, bytes(mutable))  # each object once, in order; the small one stays in band
    assert len(payload.data) < 1000
    items = loads_items(payload.data, [memoryview(b) for b in payload.buffers])
    assert items == [big, (mutable, small), {"again": big}]
    assert type(items[0]) is bytes and type(items[1][0]) is bytearray
    assert items[0] is items[2]["again"]


def test_the_in_band_pickler_is_plain_pickle() -> None:
    payload = dumps_items([b"a" * BIG, 1], out_of_band=False)
    assert payload.buffers == () and pickle.loads(payload.data) == [b"a" * BIG, 1]


def test_a_batch_with_buffers_splits_into_single_task_batches() -> None:
    big = b"z" * BIG
    singles = split_payload(dumps_items([big, 2, big]), 3)
    assert [loads_items(p.data, p.buffers) for p in singles] == [[big], [2], [big]]
    assert [len(p.buffers) for p in singles] == [1, 0, 1]


def test_tasks_get_large_arguments_as_bytes_and_bytearray(fm: Foreman) -> None:
    big, mutable = b"\x01" * (3 * BIG), bytearray(b"\x02" * BIG)
    assert fm.map(describe_buffers, [big, mutable, b"\x03"]) == [
        [("bytes", 3 * BIG, 1)], [("bytearray", BIG, 2)], [("bytes", 1, 3)]]
    assert fm.map(describe_buffers, [big] * 5, [mutable] * 5) == [[("bytes", 3 * BIG, 1), ("bytearray", BIG, 2)]] * 5
    assert fm.submit(describe_buffers, big, extra=mutable).result(timeout=60) == [
        ("bytes", 3 * BIG, 1), ("bytearray", BIG, 2)]


def test_a_worker_over_websocket_gets_large_arguments_too(spawn_worker) -> None:
    """Over the local link a batch's buffers are written as they are; a WebSocket message is one frame, joined."""
    big = bytes(range(256)) * (4 * BIG // 256)
    with Foreman(port=0, local_workers=0, dashboard=False) as fm:
        spawn_worker(fm.address, "--no-dashboard")
        fm.wait_for_workers(1, timeout=30)
        assert fm.map(describe_buffers, [big, b"\x05", big]) == [[("bytes", 4 * BIG, 0)], [("bytes", 1, 5)],
                                                                 [("bytes", 4 * BIG, 0)]]


def test_one_object_passed_twice_arrives_as_one_object(fm: Foreman) -> None:
    big = b"s" * BIG
    assert fm.submit(same_object, big, big).result(timeout=60) is True


def test_a_remote_client_and_a_detached_job_send_large_arguments_in_band(tmp_path: Path) -> None:
    """The journal keeps one pickle per batch, and a client's INPUT is one pickle: no out-of-band buffers there."""
    big = b"\x07" * (2 * BIG)
    with Foreman(port=0, local_workers=2, dashboard=False, token="secret", data_dir=str(tmp_path)) as fm:
        job = fm.submit_job(describe_buffers, [big, b"\x08"])
        assert fm.job(job.id).results(timeout=60) == [[("bytes", 2 * BIG, 7)], [("bytes", 1, 8)]]
        with Foreman.connect(fm.address, token="secret") as client:
            assert client.map(describe_buffers, [big] * 3) == [[("bytes", 2 * BIG, 7)]] * 3
            assert client.submit(describe_buffers, big).result(timeout=60) == [("bytes", 2 * BIG, 7)]
