"""A single daemon thread that runs queued jobs in order.

Speech models (Whisper, Piper) are not re-entrant and must never run on the event loop; one thread
per model owning it, with a FIFO queue, serialises requests without locks in the model code.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

_END = object()

logger = logging.getLogger(__name__)


class WorkerThread:
    """Started on first use; a failing job is logged and the thread keeps serving."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._guard:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException:  # jobs report their own errors; this is a last resort
                logger.exception("%s job failed", self._name)

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` here (after the jobs queued before it) and await its result on the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, exc: BaseException | None) -> None:
            if not future.done():
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(result)

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        self.submit(job)
        return await future

    async def stream(
        self,
        produce: Callable[[Callable[[Any], None], threading.Event], None],
        *,
        passthrough: type[Exception],
        failure: Callable[[Exception], Exception],
        on_skip: Callable[[], None] | None = None,
    ) -> AsyncIterator[Any]:
        """Run ``produce(emit, cancelled)`` here and yield what it emits, in order, on the loop.

        Leaving the iteration early sets ``cancelled`` (checked by ``produce`` between items) and a
        job still queued then never runs. ``passthrough`` errors are re-raised as they are; any other
        error is logged and re-raised as ``failure(exc)``.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # loop closed: nobody is listening anymore
                cancelled.set()

        def job() -> None:
            if cancelled.is_set():
                if on_skip is not None:
                    on_skip()
                return
            try:
                produce(emit, cancelled)
            except passthrough as exc:
                emit(exc)
            except Exception as exc:
                logger.exception("%s job failed", self._name)
                emit(failure(exc))
            finally:
                emit(_END)

        self.submit(job)
        try:
            while True:
                item = await events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
