"""Admission control and draining: how many Realtime sessions this node runs, and whether it takes more.

One counter covers both transports (WebSocket sessions and WebRTC calls), so `max_sessions` bounds
what a node commits its CPU to whatever clients connect with. A slot is reserved before a session
is built and released exactly once when the session ends, whatever ended it. `reserve` never
awaits, and the event loop runs one coroutine at a time, so no two requests can both take the last
slot.

With `max_queue_wait_s`, new sessions are also refused (the same 429) while work waits too long for
the models already: the median recent queue wait of the most congested model (telemetry.QueueWaits).
Sessions last minutes and turns come in bursts, so a count alone cannot tell a box that keeps up
from one whose callers already wait seconds for a transcript.

Draining (on SIGTERM, see cli.py) refuses new sessions, lets the live ones go on for a grace period,
then closes those left through their own close path (a WebSocket close frame, a WebRTC teardown), so
clients see a close rather than a reset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from ..telemetry import QUEUE_WAITS, SESSIONS_REFUSED, QueueWaits
from .errors import APIError, error_body

if TYPE_CHECKING:
    from ..startup import Readiness

log = logging.getLogger("openrealtime")

# What a refused client is told to wait before it tries again (seconds): sessions last minutes, so
# an immediate retry is wasted, and behind a load balancer the retry goes to another node anyway.
RETRY_AFTER_S = 5
# After the grace period: how long the sessions that were told to close get to finish tearing down.
CLOSE_TIMEOUT_S = 5.0

Closer = Callable[[], Awaitable[object]]


class Slot:
    """One admitted session. `release` is idempotent, so every path that can end a session may call it."""

    __slots__ = ("_admission", "_released", "closer", "kind")

    def __init__(self, admission: Admission, kind: str) -> None:
        self._admission = admission
        self._released = False
        self.kind = kind  # "websocket" or "webrtc", for the log
        # Set once the session runs: closes it through its normal close path when a drain's grace ends.
        self.closer: Closer | None = None

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back (once; later calls do nothing)."""
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    """Counts this node's live sessions; refuses new ones beyond `max_sessions` (429) or while draining (503)."""

    def __init__(self, max_sessions: int | None = None, *, retry_after_s: int = RETRY_AFTER_S,
                 max_queue_wait_s: float | None = None, queue_waits: QueueWaits | None = None) -> None:
        if max_sessions is not None and max_sessions < 0:
            raise ValueError("max_sessions must be None (unlimited) or >= 0")
        if max_queue_wait_s is not None and max_queue_wait_s <= 0:
            raise ValueError("max_queue_wait_s must be None (no bound) or > 0")
        self.max_sessions = max_sessions
        self.max_queue_wait_s = max_queue_wait_s
        self.queue_waits = queue_waits if queue_waits is not None else QUEUE_WAITS
        self.retry_after_s = retry_after_s
        self.draining = False
        self._slots: set[Slot] = set()
        self._idle = asyncio.Event()  # set while no slot is held; binds to a loop only when awaited
        self._idle.set()
        self._refusing = False  # the limit was hit and logged; logged again only after a slot frees
        self._queue_refusing = False  # the queue bound was hit and logged; again after an admission

    @property
    def active(self) -> int:
        """Live sessions (slots reserved and not yet released)."""
        return len(self._slots)

    def reserve(self, kind: str) -> Slot:
        """A slot for a new session, or an APIError: 503 `draining`, 429 `session_limit_reached`.

        Call it before building the session, and make sure whatever ends the session releases it.
        """
        retry = {"Retry-After": str(self.retry_after_s)}
        if self.draining:
            SESSIONS_REFUSED.labels(reason="draining").inc()
            raise APIError(503, "This server is shutting down and accepts no new sessions; connect again "
                           "(to another server).", type="server_error", code="draining", headers=retry)
        if self.max_sessions is not None and len(self._slots) >= self.max_sessions:
            if not self._refusing:
                self._refusing = True
                log.warning("Refusing new sessions: %d live, max_sessions=%d", len(self._slots), self.max_sessions)
            SESSIONS_REFUSED.labels(reason="session_limit_reached").inc()
            raise APIError(429, f"This server is at its limit of {self.max_sessions} concurrent Realtime "
                           f"sessions; try again in {self.retry_after_s} s.", type="rate_limit_error",
                           code="session_limit_reached", headers=retry)
        if self.max_queue_wait_s is not None:
            queue, wait = self.queue_waits.level()
            if wait > self.max_queue_wait_s:
                if not self._queue_refusing:  # once per overload, not once per refused caller
                    self._queue_refusing = True
                    log.warning("Refusing new sessions: %s work waits %.0f ms (median, last %g s), "
                                "max_queue_wait_ms=%.0f", queue, wait * 1000, self.queue_waits.window_s,
                                self.max_queue_wait_s * 1000)
                SESSIONS_REFUSED.labels(reason="session_limit_reached").inc()
                raise APIError(429, f"This server is overloaded: work for its {queue} model waits "
                               f"{wait * 1000:.0f} ms (its bound is {self.max_queue_wait_s * 1000:.0f} ms); "
                               f"try again in {self.retry_after_s} s.", type="rate_limit_error",
                               code="session_limit_reached", headers=retry)
            self._queue_refusing = False
        slot = Slot(self, kind)
        self._slots.add(slot)
        self._idle.clear()
        return slot

    def _release(self, slot: Slot) -> None:
        self._slots.discard(slot)
        self._refusing = False
        if not self._slots:
            self._idle.set()

    async def wait_idle(self, timeout: float, hurry: asyncio.Event | None = None) -> bool:
        """Wait until no session is live, at most `timeout` s (less if `hurry` is set); True if none is."""
        if not self._slots:
            return True
        waiters = [asyncio.ensure_future(self._idle.wait())]
        if hurry is not None:
            waiters.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        return not self._slots

    async def drain(self, grace_s: float, hurry: asyncio.Event | None = None) -> None:
        """Refuse new sessions, give the live ones `grace_s` s to end (cut short when `hurry` is set),
        then close the rest and wait (briefly) until they are gone."""
        self.draining = True
        if not self._slots:
            log.info("Draining: no live sessions")
            return
        log.info("Draining: new sessions are refused; waiting up to %g s for %d live session(s) to end "
                 "(signal again to close them now)", grace_s, len(self._slots))
        if await self.wait_idle(grace_s, hurry):
            log.info("Drained: every session ended")
            return
        left = list(self._slots)
        why = "on a second signal" if hurry is not None and hurry.is_set() else "after the grace period"
        log.info("Closing %d session(s) %s (%s)", len(left), why,
                 ", ".join(sorted({s.kind for s in left})))
        closing = [asyncio.ensure_future(s.closer()) for s in left if s.closer is not None]
        try:
            if await self.wait_idle(CLOSE_TIMEOUT_S):
                log.info("Drained: every session closed")
            else:
                log.warning("%d session(s) still open %g s after being closed", len(self._slots), CLOSE_TIMEOUT_S)
        finally:
            for task in closing:
                task.cancel()
            for outcome in await asyncio.gather(*closing, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.debug("closing a session for the drain failed: %r", outcome)


def admission_of(conn: HTTPConnection) -> Admission:
    """The app's one Admission (both session routes count against it)."""
    return conn.app.state.admission


def readiness_response(admission: Admission, readiness: Readiness) -> JSONResponse:
    """`GET /readyz`: 200 when this node should get new sessions, else 503 with why (OpenAI error shape).

    Unlike /healthz (liveness: the process answers), this tells a load balancer to send traffic
    elsewhere while the models load or the server drains.
    """
    if admission.draining:
        return JSONResponse(error_body("The server is draining: it accepts no new sessions.", "server_error",
                                       "draining"), status_code=503)
    if not readiness.ready:
        if readiness.failed:
            message = f"Could not load {', '.join(readiness.failed)} (see the server log)."
        else:
            message = f"Still loading {', '.join(readiness.loading) or 'models'}."
        body = error_body(message, "server_error", "not_ready")
        return JSONResponse({**body, "loading": list(readiness.loading), "failed": list(readiness.failed)},
                            status_code=503)
    return JSONResponse({"status": "ready"})
