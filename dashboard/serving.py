"""uvicorn for both dashboards, waking the machine once a second instead of ten times."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn's server with a one-second tick.

    uvicorn's main loop wakes every 0.1 s to refresh the ``Date`` header (which it does once a second) and to
    look at ``should_exit``. Here it wakes once a second, and :meth:`stop` ends it at once, so an idle foreman
    or worker does not wake its CPU ten times a second for its dashboard.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Shut down now (as setting ``should_exit``, without waiting for the next tick)."""
        self.should_exit = True
        self._stopping.set()

    async def main_loop(self) -> None:
        while not await self.on_tick(0):  # tick 0: the Date header is refreshed on every tick
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
