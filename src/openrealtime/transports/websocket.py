"""Adapts an accepted WebSocket to a RealtimeSession: text frames in, outbox events out."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..engine import RealtimeSession
from ..protocol.text import dumps_event

log = logging.getLogger(__name__)


async def _pump(ws: WebSocket, session: RealtimeSession) -> None:
    while (event := await session.outbox.get()) is not None:
        await ws.send_text(dumps_event(event))


async def next_frame(ws: WebSocket) -> str | bytes | None:
    """The client's next text (or binary) frame; None once it has gone."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        return None
    data = message.get("text")
    return data if data is not None else message.get("bytes") or b""


async def serve_websocket(ws: WebSocket, session: RealtimeSession) -> None:
    """Run until either side goes away; the session and its tasks are always cleaned up."""
    log.info("websocket session %s opened", session.id)
    await session.start()
    sender = asyncio.create_task(_pump(ws, session), name=f"ws-send-{session.id}")
    try:
        while (data := await next_frame(ws)) is not None:
            await session.handle_text(data)
            if sender.done():  # the socket broke while sending
                break
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
        # Flush what is left unless the socket is gone; never wait forever on a dead peer.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sender, timeout=1.0)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        with contextlib.suppress(Exception):
            await ws.close()
        log.info("websocket session %s closed", session.id)
