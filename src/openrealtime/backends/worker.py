"""A single daemon thread that owns one model and runs its work in steps, fairly across callers.

Speech models (Whisper, Piper) are not re-entrant and must never run on the event loop; one thread
per model owning it serialises requests without locks in the model code. Work is not run a whole
request at a time, though: a stream (one synthesis, one transcription) is a generator whose
``yield`` marks a step boundary (one sentence, one 30 s window), and the thread interleaves the
active streams round-robin, one step each. A new stream's first step goes ahead of other streams'
later steps, so one long synthesis (a 4,000-character answer is minutes of audio) cannot delay
another session's first audio by more than the step in progress. To keep long streams from being
starved in turn by a flood of new ones, at most ``max_first_steps`` first steps run in a row while
started streams wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from openrealtime import telemetry

_END = object()

logger = logging.getLogger(__name__)

# Steps running now on any worker thread of the process (a core busy with speech). The llama.cpp
# scheduler reads it to decide whether a generation step may use every core (see llamacpp.py).
_busy = 0
_busy_lock = threading.Lock()
_last_step_at = float("-inf")  # monotonic time a step last started or ended


# Scheduling niceness the compute threads give themselves when they start, by kind ("llm": the
# llama.cpp thread, "speech": STT/TTS workers); set once by the app from its settings.
_thread_nice = {"llm": 0, "speech": 0}


def set_thread_nice(*, llm: int, speech: int) -> None:
    """Niceness for compute threads started from now on: the event loop (media pacing for every
    call) stays at the process's own, so under saturation the kernel gives it the CPU first and
    the model threads take what is left (a thread's helpers, OpenMP or CTranslate2 pools, inherit
    it when the thread creates them)."""
    _thread_nice["llm"] = max(0, llm)
    _thread_nice["speech"] = max(0, speech)


def lower_thread_priority(kind: str) -> None:
    """Raise the calling thread's niceness by its kind's setting (Linux: niceness is per thread;
    elsewhere, or without permission, a no-op that logs once)."""
    by = _thread_nice.get(kind, 0)
    if by <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as exc:
        logger.warning("Could not lower the priority of thread %s: %s", threading.current_thread().name, exc)


def busy_workers() -> int:
    """How many speech workers are computing a step at this moment (racy by nature: a hint)."""
    return _busy


def speech_idle_s() -> float:
    """Seconds since any speech worker last computed (0 while one does): no speech in the process
    (text sessions only) reads as idle for ever."""
    return 0.0 if _busy else time.monotonic() - _last_step_at


def _count_busy(delta: int) -> None:
    global _busy, _last_step_at
    with _busy_lock:
        _busy += delta
        _last_step_at = time.monotonic()

Emit = Callable[[Any], None]


class _Task:
    """One queued unit: a plain job (one step) or a stream (steps until its generator ends)."""

    def __init__(self, worker: WorkerThread, produce: Callable[[Emit], Iterator[object]] | None = None,
                 job: Callable[[], None] | None = None, emit: Emit | None = None, *,
                 passthrough: type[Exception] = Exception,
                 failure: Callable[[Exception], Exception] | None = None,
                 on_skip: Callable[[], None] | None = None) -> None:
        self.worker = worker
        self.produce = produce
        self.job = job
        self.emit = emit
        self.passthrough = passthrough
        self.failure = failure
        self.on_skip = on_skip
        self.cancelled = threading.Event()
        self.steps: Iterator[object] | None = None
        self.queued_at = time.monotonic()

    def step(self) -> bool:
        """Run one step on the worker thread; True if the stream has more to do."""
        if self.job is not None:
            try:
                self.job()
            except BaseException:  # jobs report their own errors; this is a last resort
                logger.exception("%s job failed", self.worker.name)
            return False
        assert self.produce is not None and self.emit is not None
        try:
            if self.steps is None:
                if self.worker.queue is not None:
                    telemetry.QUEUE_WAITS.observe(self.worker.queue, time.monotonic() - self.queued_at)
                self.steps = iter(self.produce(self.emit))
            next(self.steps)
            return True
        except StopIteration:
            pass
        except self.passthrough as exc:
            self.emit(exc)
        except Exception as exc:
            logger.exception("%s job failed", self.worker.name)
            self.emit(self.failure(exc) if self.failure is not None else exc)
        except BaseException:  # last resort: the thread keeps serving and the consumer gets its end
            logger.exception("%s job failed", self.worker.name)
        self.steps = None
        self.emit(_END)
        return False

    def drop(self) -> None:
        """Forget a cancelled task: a stream that never ran is skipped, a started one closed."""
        if self.steps is None:
            if self.on_skip is not None:
                self.on_skip()
            return
        steps, self.steps = self.steps, None
        close = getattr(steps, "close", None)
        if close is not None:
            try:
                close()  # GeneratorExit at its current yield: its finally blocks run here
            except Exception:
                logger.exception("%s stream failed while closing", self.worker.name)


class WorkerThread:
    """Started on first use; a failing job is logged and the thread keeps serving."""

    def __init__(self, name: str, *, max_first_steps: int = 4, queue: str | None = None) -> None:
        """``queue``: the name under which a stream's wait for its first step is reported to
        admission's queue-time bound (``telemetry.QUEUE_WAITS``); None: not reported."""
        self.name = name
        self.queue = queue
        self.max_first_steps = max(1, max_first_steps)
        self._fresh: deque[_Task] = deque()  # not started yet (and plain jobs), in arrival order
        self._active: deque[_Task] = deque()  # started streams, round-robin
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._burst = 0  # first steps run in a row while started streams waited

    def _queue(self, task: _Task) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._fresh.append(task)
            self._cond.notify()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a one-step job; it runs after the jobs and first steps queued before it."""
        self._queue(_Task(self, job=job))

    def _cancelled(self) -> list[_Task]:
        """Take the cancelled tasks out of both queues (call with the lock held)."""
        dead: list[_Task] = []
        for tasks in (self._fresh, self._active):
            if any(t.cancelled.is_set() for t in tasks):
                dead += [t for t in tasks if t.cancelled.is_set()]
                live = [t for t in tasks if not t.cancelled.is_set()]
                tasks.clear()
                tasks.extend(live)
        return dead

    def _next(self) -> _Task:
        """Block until there is work; the task to step next (cancelled ones are dropped first)."""
        while True:
            with self._cond:
                dead = self._cancelled()
                if not dead:
                    if self._fresh and (not self._active or self._burst < self.max_first_steps):
                        self._burst = self._burst + 1 if self._active else 0
                        return self._fresh.popleft()
                    if self._active:
                        self._burst = 0
                        return self._active.popleft()
                    self._cond.wait()
                    continue
            for task in dead:  # outside the lock: closing a generator runs its code
                task.drop()

    def _run(self) -> None:
        lower_thread_priority("speech")  # before the model loads here and starts its own threads
        while True:
            task = self._next()
            _count_busy(1)
            try:
                more = task.step()
            finally:
                _count_busy(-1)
            if more:
                if task.cancelled.is_set():
                    task.drop()  # now, so memory and stats are settled before the next task runs
                else:
                    with self._cond:
                        self._active.append(task)

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` here (after the jobs and first steps queued before it); await its result."""
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
        produce: Callable[[Emit], Iterator[object]],
        *,
        passthrough: type[Exception],
        failure: Callable[[Exception], Exception],
        on_skip: Callable[[], None] | None = None,
    ) -> AsyncIterator[Any]:
        """Run the generator ``produce(emit)`` here in steps and yield what it emits, in order.

        Each ``yield`` of ``produce`` ends a step: other streams may run before the next one. It
        should not yield after its last item, or its end waits a turn. Leaving this iteration early
        closes the generator at its next step boundary (GeneratorExit at its ``yield``), and a stream
        still queued then never starts (``on_skip`` is called instead). ``passthrough`` errors are
        re-raised as they are; any other error is logged and re-raised as ``failure(exc)``.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # loop closed: nobody is listening anymore
                task.cancelled.set()

        task = _Task(self, produce, emit=emit, passthrough=passthrough, failure=failure, on_skip=on_skip)
        self._queue(task)
        try:
            while True:
                item = await events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancelled.set()  # the worker drops it before it picks its next task
