"""Sideband WebSocket: a server-side controller attached to a running WebRTC call (`?call_id=`).

It reads the call's server events from the moment it attaches (the data channel keeps getting them
too) and sends client events into the same session, typically tools and their results. It is a
view of the call, not a session: it ends when the call ends (close 1000), and the call goes on
when it disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..protocol.text import dumps_event
from .webrtc import Call
from .websocket import next_frame

log = logging.getLogger("openrealtime.sideband")

# The call's audio goes over its media track; a controller gets the rest of the events.
SKIPPED_EVENTS = frozenset({"response.output_audio.delta"})
# Sidebands one call takes at once: each is a reader the session feeds, so a key cannot attach
# without bound (a sideband takes no admission slot).
MAX_SIDEBANDS_PER_CALL = 4
# A controller that takes longer than this to accept one event has stopped reading: it is closed
# (the session's own bound, SUBSCRIBER_MAX_PENDING, caps what waits for it meanwhile).
SEND_TIMEOUT_S = 10.0


async def _send_events(ws: WebSocket, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
    while (event := await queue.get()) is not None:
        if event.get("type") not in SKIPPED_EVENTS:
            await asyncio.wait_for(ws.send_text(dumps_event(event)), SEND_TIMEOUT_S)


async def _receive_events(ws: WebSocket, call: Call) -> None:
    while (data := await next_frame(ws)) is not None:
        # Shielded: a handler cut off half-way (this socket closing) could leave the session inconsistent.
        await asyncio.shield(call.handle_client_event(data))


async def serve_sideband(ws: WebSocket, call: Call, subprotocol: str | None = None) -> None:
    """Accept `ws`, then relay between it and `call` until either ends; never ends the call.

    It subscribes before its first await, so a caller's check of `subscriber_count` still holds.
    """
    session = call.session
    queue = session.subscribe()
    try:
        await ws.accept(subprotocol=subprotocol)
    except BaseException:  # the client went away during the handshake
        session.unsubscribe(queue)
        raise
    log.info("call %s: sideband attached (%d open)", call.id, session.subscriber_count)
    sender = asyncio.create_task(_send_events(ws, queue), name=f"sideband-send-{call.id}")
    receiver = asyncio.create_task(_receive_events(ws, call), name=f"sideband-recv-{call.id}")
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        session.unsubscribe(queue)
        for task in (sender, receiver):
            task.cancel()
        for task in (sender, receiver):
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, Exception):
                await task
        if session.closed:
            code, reason = 1000, "call ended"
        elif not sender.cancelled() and isinstance(sender.exception(), (type(None), TimeoutError)):
            # The session dropped this reader (too many events unread), or a send stalled.
            code, reason = 1008, "sideband fell too far behind the call's events"
        else:
            code, reason = 1000, ""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=code, reason=reason), 2.0)
        log.info("call %s: sideband detached (%s)", call.id, reason or "client left")
