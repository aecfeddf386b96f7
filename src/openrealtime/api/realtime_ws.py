"""`GET /v1/realtime` over WebSocket: the same events as the WebRTC data channel."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from ..engine import InvalidSessionConfig, RealtimeSession
from ..transports.websocket import serve_websocket
from .auth import authenticate_session, session_key
from .client_secrets import starting_session
from .errors import APIError, error_response

router = APIRouter()


@router.websocket("/v1/realtime")
async def realtime_websocket(ws: WebSocket, model: str | None = None, call_id: str | None = None) -> None:
    """Authenticate during the handshake (401 before upgrading), then hand over to the transport."""
    try:
        secret = await authenticate_session(ws)
        if call_id is not None:
            raise APIError(400, "Sideband connections to WebRTC calls (call_id) are not supported yet.",
                           code="unsupported_parameter", param="call_id")
        # Opened with an ephemeral key: the session starts from the key's session config.
        initial, model = starting_session(secret, None, model)
        try:
            session = RealtimeSession(ws.app.state.engine, transport="websocket", initial_session=initial,
                                      model=model, api_key=session_key(ws, secret))
        except InvalidSessionConfig as exc:
            raise APIError(400, exc.message, code=exc.code, param=exc.param) from exc
    except APIError as exc:
        await ws.send_denial_response(error_response(exc))
        return
    # Browsers pass the key as a subprotocol next to "realtime"; echo the one they expect back.
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    await serve_websocket(ws, session)
