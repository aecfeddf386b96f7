"""Silero VAD v6 run frame by frame with onnxruntime (the model file ships inside faster-whisper).

The graph takes ``input`` of shape (n, 576), one row per 32 ms frame: the last 64 samples of the
previous frame (the context v5/v6 expect; zeros at the start of a stream) followed by the frame's
512 samples at 16 kHz, as float32 in [-1, 1]. The rows form a sequence through the model's LSTM,
whose state goes in as ``h``/``c`` and comes out as ``hn``/``cn``, so a batch of n frames gives the
same probabilities as n single-frame calls. That lets a stream feed whatever has accumulated in one
call while each session keeps its own state.

One InferenceSession (one intra-op thread) is shared by every stream: ``run`` is thread-safe and a
frame costs ~0.05 ms, so a pool of sessions would buy nothing.

Where the work runs: on one thread of its own (``_Worker``), never on the event loop. A frame
costs ~0.05 ms alone, but with the LLM on both cores a call inline on the loop took ~0.27 ms, and
at 16 WebRTC calls (500 frames a second) that was 18% of the loop's time (py-spy), time every
call's paced audio waits for. ``asyncio.to_thread`` would cost the loop about as much per call
(~0.1-0.2 ms), so the worker takes jobs from a ``queue.SimpleQueue`` and hands the result back
with ``call_soon_threadsafe``; onnxruntime releases the GIL while it runs. (The ~0.27 ms comes
from py-spy's wall-clock samples, so it includes the time the loop waited for a core.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from openrealtime.backends.onnx import OnnxModel

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # 32 ms at 16 kHz
CONTEXT_SAMPLES = 64
_STATE_SHAPE = (1, 1, 128)
_MODEL_FILE = "silero_vad_v6.onnx"


def default_model_path() -> Path | None:
    """The Silero file bundled with faster-whisper, found without importing faster-whisper (slow)."""
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        candidate = Path(base) / "assets" / _MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Worker:
    """The thread that runs every stream's frames, one job after another (started on first use)."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._main, name="silero-vad", daemon=True)
                    self._thread.start()
        self._jobs.put((loop, future, args))
        return future

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, args = job
            try:
                result, error = self._run(*args), None
            except Exception as exc:
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:  # that loop is closed: nobody waits for this result
                pass

    def stop(self) -> None:
        """End the thread after the jobs queued before (a later submit starts a new one)."""
        with self._start_lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread = None


class SileroVAD(OnnxModel):
    """The shared Silero model; implements ``VADModel``. Loading is lazy (a few ms) or via warmup()."""

    name = "silero-vad-v6"
    sample_rate = SAMPLE_RATE
    frame_ms = FRAME_SAMPLES * 1000 / SAMPLE_RATE

    label = "Silero VAD model"

    def __init__(self, path: str | Path | None = None, *, threads: int = 1):
        super().__init__(path, default_model_path(), threads=threads,
                         missing_hint="install faster-whisper (it ships silero_vad_v6.onnx) "
                                      "or pass the path of the ONNX file")
        self._worker = _Worker(self._run)

    def _check(self, session: Any) -> None:
        names = {i.name for i in session.get_inputs()}
        if not {"input", "h", "c"} <= names:
            raise RuntimeError(f"{self.path.name} is not a Silero v6 model with (input, h, c) inputs: {sorted(names)}")

    async def warmup(self) -> None:
        """Load the session in a thread so the first session's audio is not delayed."""
        await asyncio.to_thread(self.load)

    def new_stream(self) -> SileroVADStream:
        return SileroVADStream(self)

    async def close(self) -> None:
        """Stop the worker thread (after the frames already queued); a later stream starts it again."""
        self._worker.stop()

    def _run(self, frames: np.ndarray, h: np.ndarray, c: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        session = self.load()
        probs, hn, cn = session.run(None, {"input": frames, "h": h, "c": c})
        return np.asarray(probs, dtype=np.float32).reshape(-1), hn, cn


class SileroVADStream:
    """One session's recurrent state, sample leftovers and 64-sample context; implements ``VADStream``."""

    def __init__(self, model: SileroVAD):
        self._model = model
        self._lock = asyncio.Lock()  # keeps the state chained when calls overlap
        self._generation = 0  # bumped by reset(); results of calls started before are discarded
        self.reset()

    def reset(self) -> None:
        """Forget everything heard so far (new conversation / cleared input buffer)."""
        self._generation += 1
        self._pending = np.zeros(0, dtype=np.float32)
        self._odd_byte = b""
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)

    async def process(self, pcm16: bytes) -> list[float]:
        """One probability per completed 32 ms frame; leftover samples wait for the next call."""
        if self._odd_byte:  # a sample split across two calls
            pcm16 = self._odd_byte + pcm16
        cut = len(pcm16) - len(pcm16) % 2
        self._odd_byte = pcm16[cut:]
        samples = np.frombuffer(pcm16, dtype="<i2", count=cut // 2).astype(np.float32) / 32768.0
        # Slice frames now, synchronously, so overlapping calls keep the audio in order.
        audio = np.concatenate((self._pending, samples)) if self._pending.size else samples
        n = audio.size // FRAME_SAMPLES
        self._pending = audio[n * FRAME_SAMPLES:].copy()
        if n == 0:
            return []
        frames = audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
        batch = np.empty((n, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        batch[:, CONTEXT_SAMPLES:] = frames
        batch[0, :CONTEXT_SAMPLES] = self._context
        if n > 1:
            batch[1:, :CONTEXT_SAMPLES] = frames[:-1, -CONTEXT_SAMPLES:]
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()

        generation = self._generation
        async with self._lock:
            if generation != self._generation:  # reset() while waiting: this audio belongs to the past
                return []
            probs, h, c = await self._model._worker.submit(batch, self._h, self._c)
            if generation != self._generation:
                return []
            self._h, self._c = h, c
        return probs.tolist()
