"""The asyncio face of ``Foreman``, for code inside an event loop (FastAPI apps, notebooks with a running loop).

::

    async with Foreman.connect("ws://host:9000", token=...) as fm:
        squares = await fm.amap(square, range(1000))
        async for r in fm.aimap(square, range(1000)):
            ...
        value = await fm.asubmit(square, 7)

None of these blocks the caller's loop: the foreman's own loop thread does the networking, a helper thread walks
a job's results and hands them over with backpressure (at most :data:`AIMAP_BUFFER` results wait unread).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import concurrent.futures

    from foreman.jobs import Job

#: Results of an ``aimap`` fetched ahead of the ``async for`` that reads them.
AIMAP_BUFFER = 1024

_END = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class AsyncAPI:
    """Mixed into :class:`~foreman.client.Foreman`: awaitable versions of its ``map``, ``imap``, ``submit`` and
    ``close``."""

    map: Callable[..., list[Any]]
    imap: Callable[..., Job]
    imap_unordered: Callable[..., Job]
    submit: Callable[..., concurrent.futures.Future[Any]]
    close: Callable[[], None]

    async def __aenter__(self) -> AsyncAPI:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def amap(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kwargs: Any) -> list[Any]:
        """``await``-able :meth:`map`: every result, in input order."""
        return await asyncio.to_thread(self.map, fn, *iterables, **kwargs)

    async def asubmit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``await fm.asubmit(fn, *args)``: the result of one call (its exception raised here)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def aimap(self, fn: Callable[..., Any], *iterables: Iterable[Any], ordered: bool = True,
                    **kwargs: Any) -> AsyncIterator[Any]:
        """``async for`` over results as :meth:`imap` yields them (``ordered=False``: as they complete).
        Leaving the loop early cancels the rest of the job."""
        start = self.imap if ordered else self.imap_unordered
        job = await asyncio.to_thread(start, fn, *iterables, **kwargs)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        room = threading.Semaphore(AIMAP_BUFFER)
        stop = threading.Event()

        def pump() -> None:
            try:
                for result in job:
                    room.acquire()
                    if stop.is_set():
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, result)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as exc:  # a task's error, a timeout, a cancellation: re-raised in the reader
                if not stop.is_set():
                    loop.call_soon_threadsafe(queue.put_nowait, _Raised(exc))

        thread = threading.Thread(target=pump, name=f"crowdcompute-aimap-{job.id}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                room.release()
                if item is _END:
                    return
                if isinstance(item, _Raised):
                    raise item.error
                yield item
        finally:
            stop.set()
            room.release()
            job.cancel()
