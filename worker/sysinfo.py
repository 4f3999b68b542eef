"""What this machine is: CPU, memory and GPUs, for the handshake and the dashboard.

psutil and NVML (``pynvml``) are optional: without them the worker still runs and reports what it can.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from collections.abc import Callable
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


class GpuMonitor:
    """Live figures of the NVIDIA GPUs, through NVML. Without pynvml, a driver or a GPU it sees no GPUs.

    NVML calls can take milliseconds: call :meth:`sample` off the event loop. Nothing here raises; a figure the
    driver does not report (power on some boards, temperature on others) is None.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except Exception:  # no driver, no GPU: pynvml raises NVMLError subclasses
            return
        self._nvml = pynvml
        try:
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:
            log.warning("NVML is present but could not list GPUs: %s", exc)
            self.close()

    def sample(self) -> list[dict[str, Any]]:
        """One dict per GPU: index, name, utilization and memory_utilization (%), memory_used and memory_total
        (bytes), temperature (degrees C), power and power_limit (W)."""
        nvml = self._nvml
        out = []
        for index, handle in enumerate(self._handles):
            name = _read(lambda: nvml.nvmlDeviceGetName(handle))
            rates = _read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            memory = _read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            power = _read(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            limit = _read(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
            out.append({
                "index": index,
                "name": (name.decode() if isinstance(name, bytes) else name) or f"GPU {index}",
                "utilization": rates.gpu if rates is not None else None,
                "memory_utilization": rates.memory if rates is not None else None,
                "memory_used": int(memory.used) if memory is not None else None,
                "memory_total": int(memory.total) if memory is not None else None,
                "temperature": _read(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                "power": power / 1000 if power is not None else None,  # NVML reports milliwatts
                "power_limit": limit / 1000 if limit is not None else None,
            })
        return out

    def close(self) -> None:
        if self._nvml is not None:
            _read(self._nvml.nvmlShutdown)
            self._nvml, self._handles = None, []


def _read(call: Callable[[], Any]) -> Any:
    """The value of one NVML query, or None where the driver does not report it."""
    try:
        return call()
    except Exception:
        return None


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs seen through NVML (index, name, memory_total); empty when there are none or no driver."""
    monitor = GpuMonitor()
    try:
        return [{key: gpu[key] for key in ("index", "name", "memory_total")} for gpu in monitor.sample()]
    finally:
        monitor.close()


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
