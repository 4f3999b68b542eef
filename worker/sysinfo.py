"""What this machine is: CPU, memory and GPUs, for the handshake and the dashboard.

psutil and NVML (``pynvml``) are optional: without them the worker still runs and reports what it can.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from typing import Any

log = logging.getLogger("crowdcompute.worker")

try:
    import psutil
except ImportError:  # tiny devices may lack a wheel
    psutil = None


def cpu_count() -> int:
    return os.cpu_count() or 1


def total_memory() -> int | None:
    """Bytes of physical memory, or None if unknown."""
    if psutil is not None:
        return int(psutil.virtual_memory().total)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs seen through NVML; an empty list when there are none, no driver, or no pynvml."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: pynvml raises NVMLError subclasses
        return []
    try:
        out = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append({"index": index, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total": int(memory.total)})
        return out
    except Exception as exc:
        log.warning("NVML is present but could not list GPUs: %s", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def describe() -> dict[str, Any]:
    """The machine facts a worker announces in its HELLO."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "pid": os.getpid(),
        "cpu_count": cpu_count(),
        "memory": total_memory(),
        "gpus": gpus(),
    }
