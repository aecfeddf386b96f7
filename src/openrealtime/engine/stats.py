"""What the engine counts as it works, for `GET /metrics`; no I/O.

`EngineStats` is per engine (per app), read by the route's collector (api/metrics.py), so two apps
in one process (tests) do not share session counts. Everything in it runs on one event loop, so
plain ints and dicts need no locks. Sessions are tracked by id rather than counted up and down, so
a session closed without ever starting (a WebRTC call whose negotiation failed) or closed twice
cannot push a gauge below zero.

Turn latencies go straight to the process-wide histograms in `openrealtime.telemetry`
(`observe_turn`), from the same stage marks as the `turn-timing` log line.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

from ..telemetry import TURN_STAGE_SECONDS, TURN_STAGES, TURNS

TRANSPORTS = ("websocket", "webrtc")
# Every `response.done` status, reported even before the first response so the series exist.
RESPONSE_STATUSES = ("completed", "incomplete", "cancelled", "failed")


class EngineStats:
    """Server-wide counters: sessions open now, client events in, responses ended, errors out."""

    def __init__(self) -> None:
        self.events_received = 0
        self.responses: Counter[str] = Counter({status: 0 for status in RESPONSE_STATUSES})
        self.errors: Counter[str] = Counter()
        self.sessions_started: Counter[str] = Counter({t: 0 for t in TRANSPORTS})
        # Speculative LLM requests (engine/prefill.py): "open" while the user speaks, "pause" at a pause.
        self.prefills: Counter[str] = Counter({"open": 0, "pause": 0})
        self._active: dict[str, set[str]] = {t: set() for t in TRANSPORTS}

    def session_started(self, session_id: str, transport: str) -> None:
        """A session sent `session.created`; idempotent per id."""
        active = self._active.setdefault(transport, set())
        if session_id not in active:
            active.add(session_id)
            self.sessions_started[transport] += 1

    def session_ended(self, session_id: str, transport: str) -> None:
        """A session closed; a no-op for one that never started."""
        self._active.get(transport, set()).discard(session_id)

    def sessions_active(self, transport: str) -> int:
        return len(self._active.get(transport, ()))

    def event_received(self) -> None:
        self.events_received += 1

    def event_sent(self, event: Any) -> None:
        """Look at every server event on its way out; counts `error` events by their code."""
        if getattr(event, "type", None) == "error":
            self.errors[getattr(event.error, "code", None) or "none"] += 1

    def response_done(self, status: str) -> None:
        self.responses[status] += 1


def observe_turn(marks: Mapping[str, float], transport: str) -> None:
    """Record one answered turn's stage marks (monotonic seconds) in the stage histograms.

    Stages are timed from ``speech_end`` (when the user's last spoken audio arrived) when the turn
    began with speech, else from ``response_created``; a stage the response never reached (no
    audio, cancelled early) is left out rather than observed as zero.
    """
    since = "speech_end" if "speech_end" in marks else "response_created"
    base = marks.get(since)
    if base is None:
        return
    TURNS.labels(since=since, transport=transport).inc()
    for stage in TURN_STAGES:
        at = marks.get(stage)
        if at is not None:
            TURN_STAGE_SECONDS.labels(stage=stage, since=since, transport=transport).observe(max(0.0, at - base))


class ArrivalClock:
    """When recent caller audio arrived, so a stream position can be dated on the monotonic clock.

    The VAD decides a turn only after the silence wait, and may run behind the audio under load;
    dating the end of speech by when that audio reached the server (not by when the VAD got to it)
    keeps a backlog visible in the stage latencies. Bounded: the last `keep` appends.
    """

    def __init__(self, keep: int = 512) -> None:
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=keep)  # (end position ms, monotonic s)

    def note(self, end_ms: float, at: float) -> None:
        """Audio up to stream position `end_ms` has arrived, at monotonic time `at`."""
        self._arrivals.append((end_ms, at))

    def when(self, pos_ms: float) -> float | None:
        """Monotonic time the audio at `pos_ms` arrived; None when it is not (or no longer) known.

        Within one append, the audio is assumed to have been captured in real time up to its
        arrival, but never before the previous append arrived (a client sending faster than real
        time delivers its speech's end when it sends it).
        """
        previous: float | None = None
        for end_ms, at in self._arrivals:
            if end_ms >= pos_ms:
                estimate = at - (end_ms - pos_ms) / 1000
                return estimate if previous is None else min(at, max(estimate, previous))
            previous = at
        return None
