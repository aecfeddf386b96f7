"""`WorkerThread`: streams run in steps, round-robin, with new streams' first steps going first.

Fake step functions log each step as it starts on the worker thread; a gate holds the worker inside
a step so that other streams can be queued behind it deterministically.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from openrealtime.backends.worker import Emit, WorkerThread

TIMEOUT = 10.0


class FakeError(Exception):
    """The backend's own error type: passed through as it is."""


class Script:
    """Fake streams sharing one log of the steps the worker ran, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.started: set[str] = set()
        self.closed: set[str] = set()
        self.skipped: list[str] = []
        self.entered = threading.Event()

    def produce(self, name: str, steps: int, *, gate: threading.Event | None = None,
                permits: threading.Semaphore | None = None, fail_at: int | None = None,
                error: type[Exception] = ValueError, delay: float = 0.0) -> Callable[[Emit], Iterator[None]]:
        """A stream of ``steps`` items ``name0, name1, ...``, one per step, no yield after the last.

        With ``gate``, its first step blocks until the gate is set; with ``permits``, each later step
        takes one first; with ``fail_at``, that step raises ``error``; ``delay`` is each step's work.
        """
        def start(emit: Emit) -> Iterator[None]:
            self.started.add(name)
            return self._steps(name, steps, emit, gate, permits, fail_at, error, delay)

        return start

    def _steps(self, name: str, steps: int, emit: Emit, gate: threading.Event | None,
               permits: threading.Semaphore | None, fail_at: int | None, error: type[Exception],
               delay: float) -> Iterator[None]:
        try:
            for i in range(steps):
                self.log.append(f"{name}{i}")
                if i == 0 and gate is not None:
                    self.entered.set()
                    assert gate.wait(TIMEOUT)
                if i > 0 and permits is not None:
                    assert permits.acquire(timeout=TIMEOUT)
                if delay:
                    time.sleep(delay)
                if i == fail_at:
                    raise error(f"{name} broke")
                emit(f"{name}{i}")
                if i < steps - 1:
                    yield
        except GeneratorExit:
            self.closed.add(name)
            raise

    def stream(self, worker: WorkerThread, produce: Callable[[Emit], Iterator[None]], name: str
               ) -> AsyncIterator[Any]:
        return worker.stream(produce, passthrough=FakeError, failure=lambda exc: RuntimeError(f"wrapped: {exc}"),
                             on_skip=lambda: self.skipped.append(name))


async def collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


async def settle() -> None:
    """Let freshly created consumer tasks run up to their first wait (their stream is then queued)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def wait_entered(script: Script) -> None:
    assert await asyncio.to_thread(script.entered.wait, TIMEOUT)


async def test_first_steps_go_first_then_round_robin() -> None:
    worker = WorkerThread("test-rr")
    s = Script()
    gate = threading.Event()
    a = asyncio.create_task(collect(s.stream(worker, s.produce("a", 6, gate=gate), "a")))
    await wait_entered(s)  # the worker is inside a0
    b = asyncio.create_task(collect(s.stream(worker, s.produce("b", 3), "b")))
    c = asyncio.create_task(collect(s.stream(worker, s.produce("c", 2), "c")))
    await settle()
    gate.set()
    got = await asyncio.wait_for(asyncio.gather(a, b, c), TIMEOUT)
    assert got == [[f"a{i}" for i in range(6)], ["b0", "b1", "b2"], ["c0", "c1"]]
    assert s.log == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5"]
    assert not s.closed and not s.skipped


async def test_a_short_stream_ends_before_a_long_one_started_earlier() -> None:
    worker = WorkerThread("test-short")
    s = Script()
    gate = threading.Event()
    done: list[str] = []

    async def run(name: str, produce: Callable[[Emit], Iterator[None]]) -> None:
        await collect(s.stream(worker, produce, name))
        done.append(name)

    long = asyncio.create_task(run("long", s.produce("long", 50, gate=gate, delay=0.005)))
    await wait_entered(s)
    short = asyncio.create_task(run("short", s.produce("short", 2)))
    await settle()
    gate.set()
    await asyncio.wait_for(asyncio.gather(long, short), TIMEOUT)
    assert done == ["short", "long"]
    assert s.log.index("short0") == 1 and s.log.index("short1") == 3  # one long step in between


async def test_first_steps_cannot_starve_started_streams() -> None:
    worker = WorkerThread("test-burst", max_first_steps=2)
    s = Script()
    gate = threading.Event()
    a = asyncio.create_task(collect(s.stream(worker, s.produce("a", 4, gate=gate), "a")))
    await wait_entered(s)
    fresh = [asyncio.create_task(collect(s.stream(worker, s.produce(f"f{i}", 1), f"f{i}")))
             for i in range(1, 5)]
    await settle()
    gate.set()
    await asyncio.wait_for(asyncio.gather(a, *fresh), TIMEOUT)
    assert s.log == ["a0", "f10", "f20", "a1", "f30", "f40", "a2", "a3"]


async def test_closing_one_stream_leaves_the_others_untouched() -> None:
    worker = WorkerThread("test-close")
    s = Script()
    gate = threading.Event()
    permits = threading.Semaphore(1)  # a1 may run; a2 waits until a has been closed
    b = asyncio.create_task(collect(s.stream(worker, s.produce("b", 8, gate=gate), "b")))
    await wait_entered(s)
    a_items = s.stream(worker, s.produce("a", 1000, permits=permits), "a")
    first = asyncio.create_task(anext(a_items))
    await settle()
    gate.set()
    assert await asyncio.wait_for(first, TIMEOUT) == "a0"
    assert await asyncio.wait_for(anext(a_items), TIMEOUT) == "a1"
    await a_items.aclose()
    permits.release()  # a step in progress (a2) may end; the worker then closes a instead of going on
    assert await asyncio.wait_for(b, TIMEOUT) == [f"b{i}" for i in range(8)]
    assert await asyncio.wait_for(worker.run(lambda: set(s.closed)), TIMEOUT) == {"a"}
    a_steps = [step for step in s.log if step.startswith("a")]
    assert a_steps in (["a0", "a1"], ["a0", "a1", "a2"]), a_steps  # a2 only if it had begun
    assert [step for step in s.log if step.startswith("b")] == [f"b{i}" for i in range(8)]
    assert s.log[:4] == ["b0", "a0", "b1", "a1"]
    assert not s.skipped


async def test_a_queued_stream_cancelled_before_it_starts_never_runs() -> None:
    worker = WorkerThread("test-skip")
    s = Script()
    gate = threading.Event()
    a = asyncio.create_task(collect(s.stream(worker, s.produce("a", 3, gate=gate), "a")))
    await wait_entered(s)
    queued = asyncio.create_task(collect(s.stream(worker, s.produce("q", 3), "q")))
    await settle()
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    gate.set()
    assert await asyncio.wait_for(a, TIMEOUT) == ["a0", "a1", "a2"]
    await asyncio.wait_for(worker.run(lambda: None), TIMEOUT)
    assert "q" not in s.started and not any(step.startswith("q") for step in s.log)
    assert s.skipped == ["q"]


async def test_an_error_fails_only_its_own_stream() -> None:
    worker = WorkerThread("test-error")
    s = Script()
    gate = threading.Event()
    ok = asyncio.create_task(collect(s.stream(worker, s.produce("ok", 6, gate=gate), "ok")))
    await wait_entered(s)
    received: dict[str, list[Any]] = {"bad": [], "own": []}

    async def consume(name: str, produce: Callable[[Emit], Iterator[None]]) -> BaseException:
        with pytest.raises(Exception) as info:
            async for item in s.stream(worker, produce, name):
                received[name].append(item)
        return info.value

    bad = asyncio.create_task(consume("bad", s.produce("bad", 5, fail_at=2)))
    own = asyncio.create_task(consume("own", s.produce("own", 5, fail_at=1, error=FakeError)))
    await settle()
    gate.set()
    bad_error, own_error = await asyncio.wait_for(asyncio.gather(bad, own), TIMEOUT)
    assert isinstance(bad_error, RuntimeError) and str(bad_error) == "wrapped: bad broke"
    assert isinstance(own_error, FakeError) and str(own_error) == "own broke"  # passed through as is
    assert received == {"bad": ["bad0", "bad1"], "own": ["own0"]}
    assert await asyncio.wait_for(ok, TIMEOUT) == [f"ok{i}" for i in range(6)]
    # The thread keeps serving after both failures.
    assert await asyncio.wait_for(collect(s.stream(worker, s.produce("after", 2), "after")), TIMEOUT) == [
        "after0", "after1"]


async def test_an_error_while_starting_is_reported() -> None:
    worker = WorkerThread("test-start-error")

    def broken(emit: Emit) -> Iterator[None]:
        raise FakeError("no model")

    with pytest.raises(FakeError, match="no model"):
        await asyncio.wait_for(collect(worker.stream(broken, passthrough=FakeError, failure=RuntimeError)),
                               TIMEOUT)


async def test_plain_jobs_run_as_first_steps_and_report_errors() -> None:
    worker = WorkerThread("test-jobs")
    s = Script()
    gate = threading.Event()
    long = asyncio.create_task(collect(s.stream(worker, s.produce("long", 20, gate=gate), "long")))
    await wait_entered(s)

    def job() -> int:
        s.log.append("job")
        return 42

    def failing() -> None:
        raise KeyError("gone")

    result = asyncio.create_task(worker.run(job))
    failed = asyncio.create_task(worker.run(failing))
    await settle()
    gate.set()
    assert await asyncio.wait_for(result, TIMEOUT) == 42
    with pytest.raises(KeyError):
        await asyncio.wait_for(failed, TIMEOUT)
    assert len(await asyncio.wait_for(long, TIMEOUT)) == 20
    assert s.log.index("job") == 1  # right after the step in progress, not after the long stream


async def test_the_loop_stays_free_while_a_step_blocks() -> None:
    worker = WorkerThread("test-loop")
    s = Script()
    gate = threading.Event()
    stream = asyncio.create_task(collect(s.stream(worker, s.produce("a", 2, gate=gate), "a")))
    await wait_entered(s)
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0.01)
        ticks += 1
    assert not stream.done()
    gate.set()
    assert await asyncio.wait_for(stream, TIMEOUT) == ["a0", "a1"]
    assert ticks == 5


async def test_a_streams_wait_for_its_first_step_is_reported_to_admission() -> None:
    from openrealtime.telemetry import QUEUE_WAITS

    worker = WorkerThread("test-waits", queue="test-waits")
    unreported = WorkerThread("test-unreported")
    s = Script()
    gate = threading.Event()
    a = asyncio.create_task(collect(s.stream(worker, s.produce("a", 1, gate=gate), "a")))
    await wait_entered(s)
    b = asyncio.create_task(collect(s.stream(worker, s.produce("b", 1), "b")))
    await settle()
    await asyncio.sleep(0.3)  # b waits behind a's step
    gate.set()
    await asyncio.wait_for(asyncio.gather(a, b), TIMEOUT)
    await collect(s.stream(unreported, s.produce("c", 1), "c"))
    waits = [w for t, w in QUEUE_WAITS._waits["test-waits"]]
    assert len(waits) == 2 and waits[0] < 0.25 and waits[1] >= 0.3, waits
    assert "test-unreported" not in QUEUE_WAITS.levels() and None not in QUEUE_WAITS.levels()
