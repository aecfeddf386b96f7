"""`GET /v1/realtime` over WebSocket: the same events as the WebRTC data channel."""

from __future__ import annotations

import contextlib
import functools
import logging

from fastapi import APIRouter, WebSocket

from ..engine import InvalidSessionConfig, RealtimeSession
from ..transports.sideband import MAX_SIDEBANDS_PER_CALL, serve_sideband
from ..transports.webrtc import Call
from ..transports.websocket import serve_websocket
from .admission import Slot, admission_of
from .auth import authenticate_session, session_key
from .client_secrets import ClientSecret, starting_session
from .cluster import FORWARDED_HEADER, Cluster
from .errors import APIError, error_response

router = APIRouter()
log = logging.getLogger(__name__)


@router.websocket("/api/v1/realtime/session")
async def inworld_websocket(ws: WebSocket, key: str | None = None, protocol: str | None = None,
                            model: str | None = None) -> None:
    """Inworld's documented URL (`?key=<session id>&protocol=realtime`, Basic or Bearer auth).

    `key` is the client's own name for the session (not a credential): it is logged, so an
    operator can match a client's logs to ours. The session is the same as on `/v1/realtime`.
    """
    if protocol not in (None, "realtime"):
        await ws.send_denial_response(error_response(APIError(
            400, f"Unsupported protocol '{protocol}'; this server speaks 'realtime'.",
            code="unsupported_parameter", param="protocol")))
        return
    await realtime_websocket(ws, model=model, call_id=None, client_session=key)


@router.websocket("/v1/realtime")
async def realtime_websocket(ws: WebSocket, model: str | None = None, call_id: str | None = None,
                             client_session: str | None = None, intent: str | None = None) -> None:
    """Authenticate during the handshake (401 before upgrading), then hand over to the transport.

    `?intent=transcription` (the hosted API's URL for it) opens a transcription session; so does an
    ephemeral key minted with a `"type": "transcription"` session.

    Admission (429 at `max_sessions`, 503 while draining) is decided after authentication, so only
    a client with a key learns how busy the server is; the slot is held until the session ends.
    With `call_id` it is a sideband to that WebRTC call instead: no new session, so no slot.
    """
    if call_id is not None:
        await _sideband(ws, call_id)
        return
    slot: Slot | None = None
    try:
        try:
            secret = await authenticate_session(ws)
            if intent not in (None, "", "transcription", "realtime"):
                raise APIError(400, f"Invalid value for 'intent': {intent[:64]!r}. Supported values are: "
                               "'transcription'.", code="invalid_value", param="intent")
            slot = admission_of(ws).reserve("websocket")
            # Opened with an ephemeral key: the session starts from the key's session config.
            initial, model = starting_session(secret, None, model)
            try:
                session = RealtimeSession(ws.app.state.engine, transport="websocket", initial_session=initial,
                                          model=model, api_key=session_key(ws, secret),
                                          session_type="transcription" if intent == "transcription" else None)
            except InvalidSessionConfig as exc:
                raise APIError(400, exc.message, code=exc.code, param=exc.param) from exc
        except APIError as exc:
            await ws.send_denial_response(error_response(exc))
            return
        if client_session:
            log.info("websocket session %s is the client's session %r", session.id, client_session[:128])
        # Browsers pass the key as a subprotocol next to "realtime"; echo the one they expect back.
        offered = ws.scope.get("subprotocols") or []
        try:
            await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        except BaseException:  # the client went away during the handshake: the session never ran
            await session.close()
            raise
        slot.closer = functools.partial(_close_for_drain, ws)
        await serve_websocket(ws, session)
    finally:
        if slot is not None:
            slot.release()


async def _sideband(ws: WebSocket, call_id: str) -> None:
    """`?call_id=`: the same authentication, then attach to the call (refusals before upgrading)."""
    try:
        secret = await authenticate_session(ws)
        cluster: Cluster = ws.app.state.cluster
        manager = getattr(ws.app.state, "calls", None)
        if (cluster.shared and FORWARDED_HEADER not in ws.headers
                and (manager is None or manager.get(call_id) is None)):
            owner = await cluster.owner_of(call_id)  # another node's call: its owner serves the sideband
            if owner is not None:
                await cluster.proxy_sideband(ws, owner, call_id)
                return
        call = _sideband_call(ws, call_id, secret)
    except APIError as exc:
        await ws.send_denial_response(error_response(exc))
        return
    offered = ws.scope.get("subprotocols") or []
    await serve_sideband(ws, call, subprotocol="realtime" if "realtime" in offered else None)


def _sideband_call(ws: WebSocket, call_id: str, secret: ClientSecret | None) -> Call:
    """The live call a sideband may attach to: 404 if there is none, 403 unless the caller owns it.

    Owning is having the call's account: the API key that placed it (or minted the ek it was placed
    with); an ek owns only the calls placed with it. On an open server anyone owns every call.
    """
    manager = getattr(ws.app.state, "calls", None)
    call = manager.get(call_id) if manager is not None else None
    if call is None:
        raise APIError(404, f"Call '{call_id}' not found.", code="call_not_found", param="call_id")
    if secret is not None:
        owned = ws.app.state.client_secrets.owns_call(call, secret)
    else:
        owned = session_key(ws) == getattr(call.session, "api_key", None)
    if not owned:
        raise APIError(403, f"Call '{call_id}' was not created with this API key.", code="call_not_owned",
                       param="call_id")
    if call.session.subscriber_count >= MAX_SIDEBANDS_PER_CALL:
        raise APIError(409, f"Call '{call_id}' already has {MAX_SIDEBANDS_PER_CALL} sideband connections.",
                       code="sideband_limit_reached", param="call_id")
    return call


async def _close_for_drain(ws: WebSocket) -> None:
    """Close frame 1001 (going away): the session's own loop sees the disconnect and ends it as usual."""
    with contextlib.suppress(RuntimeError):  # already closing (the client or the session went first)
        await ws.close(code=1001, reason="server shutting down")
