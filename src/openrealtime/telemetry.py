"""The process's Prometheus metric objects, in one registry that `GET /metrics` renders.

A leaf module (no project imports), so the engine, the transports, the API and the llama.cpp
scheduler can all import it without import cycles. The metrics live in a module-level
`CollectorRegistry` (`REGISTRY`), not prometheus_client's global default one: tests can read it in
isolation, and libraries that register on the default registry do not leak into our scrape.

Observing is cheap (a lock and an add) and thread-safe, so the llama.cpp compute thread may call
`.observe()` / `.inc()` directly without hopping onto the event loop.

Useful queries:

- tokens/s: ``rate(openrealtime_llm_tokens_total{kind="generated"}[1m])`` (``kind="prompt"`` for
  prefill throughput, ``sum by (model) (rate(openrealtime_llm_tokens_total[1m]))`` for all work).
- decode utilisation of the compute thread: ``rate(openrealtime_llm_decode_seconds_total[1m])``.
- p95 time to first audio after the user stopped speaking: ``histogram_quantile(0.95, sum by (le)
  (rate(openrealtime_turn_stage_seconds_bucket{stage="audio_out",since="speech_end"}[5m])))``.
- time an LLM request waits for the model: ``openrealtime_llm_queue_wait_seconds`` (same pattern).

Labels are kept to small, fixed sets (stage, transport, reason, model, kind): never a session or
call id, which would make one series per caller and explode the scrape's cardinality.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# No `<name>_created` series: twice the series for a start timestamp nobody queries (this switch is
# process-wide in prometheus_client; this server owns its process).
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

# --- LLM serving (the llama.cpp batching scheduler observes these) ---------------------------------

LLM_QUEUE_WAIT = Histogram(
    "openrealtime_llm_queue_wait_seconds",
    "Time from an LLM request's arrival to its first model evaluation.",
    ["model"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LLM_BATCH_SIZE = Histogram(
    "openrealtime_llm_batch_sequences",
    "Sequences evaluated together in one decode step.",
    ["model"], registry=REGISTRY,
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
LLM_TOKENS = Counter(
    "openrealtime_llm_tokens",
    "LLM tokens by kind: prompt (evaluated), cached (reused from the cache) or generated.",
    ["model", "kind"], registry=REGISTRY,
)
LLM_ACTIVE = Gauge(
    "openrealtime_llm_active_requests",
    "LLM requests being evaluated now.",
    ["model"], registry=REGISTRY,
)
LLM_WAITING = Gauge(
    "openrealtime_llm_waiting_requests",
    "LLM requests queued and not yet evaluated.",
    ["model"], registry=REGISTRY,
)
LLM_DECODE_SECONDS = Counter(
    "openrealtime_llm_decode_seconds",
    "Seconds spent in llama_decode",
    ["model"], registry=REGISTRY,
)

# --- Voice turns ------------------------------------------------------------------------------------

# The stages of the `turn-timing` log line (bench/voice_latency.py's STAGES, same names): the VAD
# decision (speech_stopped), transcript ready, prompt built, LLM first token, first clause to speak,
# TTS first chunk, and the first audio out (WebRTC: the first frame sent; WebSocket: the first delta).
TURN_STAGES = ("speech_stopped", "stt_done", "prompt_ready", "llm_first_token", "first_clause",
               "tts_first_chunk", "audio_out")
# What a turn's stages are timed from: the end of the user's speech (server VAD turns; estimated
# from when that audio arrived) or, with no speech behind the response (text turns, manual
# commits), the response's creation.
TURN_ORIGINS = ("speech_end", "response_created")

TURN_STAGE_SECONDS = Histogram(
    "openrealtime_turn_stage_seconds",
    "Seconds from the turn's origin (since: end of user speech, or response creation) to each stage.",
    ["stage", "since", "transport"], registry=REGISTRY,
    buckets=(0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10, 30),
)
TURNS = Counter(
    "openrealtime_turns",
    "Responses whose stage timing was recorded (one turn-timing log line each).",
    ["since", "transport"], registry=REGISTRY,
)

# --- Admission --------------------------------------------------------------------------------------

REFUSAL_REASONS = ("session_limit_reached", "draining")  # 429 and 503 (api/admission.py)
SESSIONS_REFUSED = Counter(
    "openrealtime_sessions_refused",
    "New sessions refused at admission, by reason: session_limit_reached (429) or draining (503).",
    ["reason"], registry=REGISTRY,
)

# --- Queue waits (admission's queue-time bound) ------------------------------------------------------

QUEUE_WAIT_WINDOW_S = 10.0


class QueueWaits:
    """How long work has lately waited for each model (LLM, STT, TTS): admission's overload signal.

    Each model reports, when a request's first step starts, how long it waited for it. The level is
    the median of the waits reported in the last ``window_s``, per queue, and the worst queue's
    median is the box's: one congested stage (transcripts of many turns that end together) is enough
    to make new callers wait. Only waits of requests that started are counted (nothing to leak if a
    request is dropped), and with no reports the level decays to 0 within ``window_s``. Thread-safe:
    the llama.cpp compute thread and the speech workers report from their own threads.
    """

    def __init__(self, window_s: float = QUEUE_WAIT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._waits: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, queue: str, seconds: float) -> None:
        """A request of ``queue`` started after waiting ``seconds``."""
        now = self._clock()
        with self._lock:
            waits = self._waits.setdefault(queue, deque())
            waits.append((now, max(0.0, seconds)))
            self._prune(waits, now)

    def _prune(self, waits: deque[tuple[float, float]], now: float) -> None:
        while waits and waits[0][0] < now - self.window_s:
            waits.popleft()

    def levels(self) -> dict[str, float]:
        """The median recent wait of each queue that reported within the window (seconds)."""
        now = self._clock()
        with self._lock:
            out = {}
            for queue, waits in self._waits.items():
                self._prune(waits, now)
                if waits:
                    out[queue] = statistics.median(w for _, w in waits)
            return out

    def level(self) -> tuple[str | None, float]:
        """The most congested queue and its median recent wait; (None, 0.0) when all are quiet."""
        levels = self.levels()
        if not levels:
            return None, 0.0
        queue = max(levels, key=levels.__getitem__)
        return queue, levels[queue]


QUEUE_WAITS = QueueWaits()

# --- Paced audio out --------------------------------------------------------------------------------
# By transport only: a label per call would make one series per caller.

AUDIO_FRAMES_LATE = Counter(
    "openrealtime_audio_frames_late",
    "Outgoing paced audio frames released more than one frame duration after their slot.",
    ["transport"], registry=REGISTRY,
)
AUDIO_FRAMES_DROPPED = Counter(
    "openrealtime_audio_frames_dropped",
    "Outgoing paced audio frame slots skipped after a stall (the listener hears a gap).",
    ["transport"], registry=REGISTRY,
)

# Series that exist at 0 from the start, so rate() and alerts see them before the first event.
for _reason in REFUSAL_REASONS:
    SESSIONS_REFUSED.labels(reason=_reason)
for _metric in (AUDIO_FRAMES_LATE, AUDIO_FRAMES_DROPPED):
    _metric.labels(transport="webrtc")
