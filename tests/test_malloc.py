"""glibc's malloc in task processes: large blocks freed are used again, not mapped afresh each time."""

from __future__ import annotations

from pathlib import Path

import pytest
from tasks import large_block_faults

from foreman import Foreman
from worker.malloc import is_glibc

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

pytestmark = [
    pytest.mark.skipif(not is_glibc(), reason="not a glibc system"),
    pytest.mark.skipif(_THP.exists() and "[always]" in _THP.read_text(),
                       reason="transparent huge pages always on: fresh memory takes few page faults anyway"),
]


def test_task_processes_reuse_large_blocks_unless_memory_is_capped(spawn_worker) -> None:
    with Foreman(port=0, local_workers=1, dashboard=False) as fm:
        fm.wait_for_workers(1, timeout=30)
        assert fm.submit(large_block_faults).result(timeout=60) < 1_000
    with Foreman(port=0, local_workers=0, dashboard=False) as fm:  # glibc's defaults: mapped and faulted afresh
        spawn_worker(fm.address, "--no-dashboard", "--max-memory", "1 GiB")
        fm.wait_for_workers(1, timeout=30)
        assert fm.submit(large_block_faults).result(timeout=60) > 10_000
