"""The CrowdCompute worker: ``python -m worker ws://HOST:9000 --token T``.

Importing this package is light: it needs websockets and cloudpickle; psutil, NVML and the dashboard are optional.
"""

from worker.checkpoints import checkpoint, last_checkpoint
from worker.worker import Worker, WorkerConfig

__all__ = ["Worker", "WorkerConfig", "checkpoint", "last_checkpoint"]
