"""Counters the engine bumps as it works and `GET /metrics` reads: plain numbers, no I/O.

Everything runs on one event loop, so plain ints and dicts need no locks. Sessions are tracked by
id rather than counted up and down, so a session closed without ever starting (a WebRTC call whose
negotiation failed) or closed twice cannot push a gauge below zero.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

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
