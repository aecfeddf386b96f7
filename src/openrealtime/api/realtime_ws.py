"""`GET /v1/realtime` over WebSocket: the same events as the WebRTC data channel."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from ..engine import RealtimeSession
from ..transports.websocket import serve_websocket
from .auth import authenticate
from .errors import APIError, error_response

router = APIRouter()


@router.websocket("/v1/realtime")
async def realtime_websocket(ws: WebSocket, model: str | None = None, call_id: str | None = None) -> None:
    """Authenticate during the handshake (401 before upgrading), then hand over to the transport."""
    try:
        authenticate(ws)
        if call_id is not None:
            raise APIError(400, "Sideband connections to WebRTC calls (call_id) are not supported yet.",
                           code="unsupported_parameter", param="call_id")
    except APIError as exc:
        await ws.send_denial_response(error_response(exc))
        return
    session = RealtimeSession(ws.app.state.engine, transport="websocket", model=model)
    # Browsers pass the key as a subprotocol next to "realtime"; echo the one they expect back.
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    await serve_websocket(ws, session)
