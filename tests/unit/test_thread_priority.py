"""Model threads lower their own scheduling priority, and only their own (``*_thread_nice``).

Linux niceness is per thread: the event loop (which paces every call's audio) must keep the
process's niceness while a speech worker, and the threads it starts, run nicer.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from openrealtime.backends import worker
from openrealtime.backends.worker import WorkerThread, set_thread_nice

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux behaviour")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.fixture
def restore_nice():
    saved = dict(worker._thread_nice)
    yield
    worker._thread_nice.update(saved)


def test_speech_worker_runs_nicer_and_its_threads_inherit_it(restore_nice) -> None:
    base = _nice()
    set_thread_nice(llm=0, speech=3)
    seen: dict[str, int] = {}

    def job() -> None:
        seen["worker"] = _nice()
        # A thread the model starts from its worker (CTranslate2's pool, OpenMP) inherits it.
        child = threading.Thread(target=lambda: seen.__setitem__("child", _nice()))
        child.start()
        child.join()

    async def main() -> None:
        await WorkerThread("nice-test").run(job)

    asyncio.run(main())
    expected = min(19, base + 3)
    assert seen == {"worker": expected, "child": expected}
    assert _nice() == base  # the calling thread (here: the event loop's) is untouched


def test_zero_leaves_the_worker_at_the_process_niceness(restore_nice) -> None:
    set_thread_nice(llm=0, speech=0)
    seen: list[int] = []

    async def main() -> None:
        await WorkerThread("nice-zero").run(lambda: seen.append(_nice()))

    asyncio.run(main())
    assert seen == [_nice()]


def test_settings_validate_the_range() -> None:
    from pydantic import ValidationError

    from openrealtime.config import Settings

    assert Settings(llm_thread_nice=10, speech_thread_nice=5).llm_thread_nice == 10
    with pytest.raises(ValidationError):
        Settings(speech_thread_nice=20)
    with pytest.raises(ValidationError):
        Settings(llm_thread_nice=-1)


def test_llama_compute_thread_runs_nicer() -> None:
    """In a fresh process: the compute thread is a per-process singleton, started on first use."""
    import subprocess

    code = (
        "import os, threading\n"
        "from openrealtime.backends.worker import set_thread_nice\n"
        "from openrealtime.backends.llamacpp import _ComputeThread\n"
        "nice = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())\n"
        "base = nice()\n"
        "set_thread_nice(llm=4, speech=0)\n"
        "print(base, _ComputeThread.get().call(nice), nice())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    base, compute, caller = map(int, out.stdout.split())
    assert compute == min(19, base + 4)
    assert caller == base
