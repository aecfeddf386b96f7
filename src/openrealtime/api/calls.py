"""WebRTC signaling routes: create a call (every client dialect), hang up, list ICE servers.

Dialects of `POST /v1/realtime/calls` (all answer with `Location: /v1/realtime/calls/{id}`):

- JSON `{"sdp", "session"?}` -> 200 JSON `{"id", "sdp", "ice_servers"}` (Inworld's documented form);
  with `Accept: application/sdp` -> 201 SDP text.
- `Content-Type: application/sdp` raw offer -> 201 SDP text (OpenAI, @openai/agents, browsers).
- `multipart/form-data` with `sdp` and optional `session` (JSON text) -> 201 SDP text (openai-python
  `client.realtime.calls.create` with a session; without one it sends the raw form).

An explicit `Accept` naming only `application/json` turns any dialect's answer into the JSON form.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from ..engine import InvalidSessionConfig
from ..protocol.errors import ProtocolError
from ..protocol.limits import check_depth, loads_limited
from ..transports.webrtc import MAX_OFFER_BYTES, CallManager, InvalidOffer, ShuttingDown
from .admission import admission_of
from .auth import require_key, session_key
from .client_secrets import starting_session
from .cluster import FORWARDED_HEADER, Cluster
from .errors import APIError

router = APIRouter(dependencies=[Depends(require_key)])

SDP_MEDIA_TYPE = "application/sdp"
# Bodies larger than this are refused before parsing (an SDP offer plus a session config).
MAX_BODY_BYTES = MAX_OFFER_BYTES + 1024 * 1024

Dialect = Literal["json", "sdp", "form"]


@dataclass(slots=True)
class OfferRequest:
    sdp: str
    session: dict[str, Any] | None
    dialect: Dialect


def media_type(content_type: str | None) -> str:
    """`multipart/form-data; boundary=x` -> `multipart/form-data`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def classify_body(content_type: str | None, body: bytes) -> Dialect:
    """Pick the dialect; sniff bodies that came without a usable Content-Type.

    `curl -d @offer.sdp` sends `application/x-www-form-urlencoded`, and some clients send
    `text/plain`: an SDP body is recognised by its `v=` first line instead of being misparsed.
    """
    kind = media_type(content_type)
    head = body.lstrip()[:2]
    if kind in ("application/json", "text/json") or kind.endswith("+json"):
        return "json"
    if kind == SDP_MEDIA_TYPE:
        return "sdp"
    if kind == "multipart/form-data":
        return "form"
    if kind == "application/x-www-form-urlencoded":
        return "sdp" if head == b"v=" else "form"
    if kind in ("", "text/plain", "application/octet-stream"):
        if head == b"v=":
            return "sdp"
        if head[:1] == b"{":
            return "json"
    raise APIError(
        415,
        f"Unsupported Content-Type {kind or '(none)'!r}: send application/sdp, application/json "
        "or multipart/form-data.",
        code="unsupported_media_type",
    )


def _check_depth(value: Any, param: str) -> None:
    try:
        check_depth(value)
    except ProtocolError as exc:
        raise APIError(400, exc.message, code=exc.code, param=param) from None


def parse_session(value: Any) -> dict[str, Any] | None:
    """The optional `session` field, given as an object (JSON body) or JSON text (form field)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = loads_limited(value)
        except ProtocolError as exc:
            raise APIError(400, f"'session' is not valid: {exc.message}", code=exc.code,
                           param="session") from None
        if value is None:
            return None
    else:
        _check_depth(value, "session")
    if not isinstance(value, dict):
        raise APIError(400, "'session' must be an object.", code="invalid_type", param="session")
    return value


def require_sdp(value: Any) -> str:
    if value is None or value == "":
        raise APIError(400, "Missing required parameter: 'sdp'.", code="missing_required_parameter",
                       param="sdp")
    if not isinstance(value, str):
        raise APIError(400, "'sdp' must be a string.", code="invalid_type", param="sdp")
    return value


def parse_json_offer(body: bytes) -> OfferRequest:
    try:
        data = loads_limited(body)
    except ProtocolError as exc:
        raise APIError(400, exc.message, code=exc.code) from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_type")
    return OfferRequest(require_sdp(data.get("sdp")), parse_session(data.get("session")), "json")


def parse_sdp_offer(body: bytes) -> OfferRequest:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, "The SDP offer is not UTF-8 text.", code="invalid_offer", param="sdp") from exc
    return OfferRequest(require_sdp(text.strip()), None, "sdp")


def wants_json(dialect: Dialect, accept: str | None) -> bool:
    """JSON answers for the JSON dialect unless SDP is asked for; SDP text otherwise."""
    types = {media_type(part) for part in (accept or "").split(",")}
    if SDP_MEDIA_TYPE in types:
        return False
    if "application/json" in types:
        return True
    return dialect == "json"


async def _form_text(value: str | UploadFile | None) -> str | None:
    if isinstance(value, UploadFile):  # a part sent with a filename
        raw = await value.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise APIError(400, "Form fields must be UTF-8 text.", code="invalid_value") from exc
    return value


async def read_offer(request: Request) -> OfferRequest:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.",
                       code="request_too_large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.",
                       code="request_too_large")
    dialect = classify_body(request.headers.get("content-type"), body)
    if dialect == "json":
        return parse_json_offer(body)
    if dialect == "sdp":
        return parse_sdp_offer(body)
    try:
        form = await request.form()  # re-reads the cached body
    except Exception as exc:  # malformed multipart
        raise APIError(400, f"Malformed form body: {exc}", code="invalid_value") from exc
    try:
        sdp = require_sdp(await _form_text(form.get("sdp")))
        session = parse_session(await _form_text(form.get("session")))
    finally:
        await form.close()
    return OfferRequest(sdp, session, "form")


def _manager(request: Request) -> CallManager:
    return request.app.state.calls


@router.post("/v1/realtime/calls")
async def create_call(request: Request, model: str | None = None) -> Response:
    """Create a WebRTC call from an SDP offer."""
    # Admission first (429 / 503 draining), before the body is read; the slot is the call's once it
    # starts (released when it ends), and is given back here if it never does.
    slot = admission_of(request).reserve("webrtc")
    try:
        offer = await read_offer(request)
        chosen_model = model
        if offer.session and isinstance(offer.session.get("model"), str) and offer.session["model"]:
            chosen_model = offer.session["model"]
        # Made with an ephemeral key: start from its session config (the request's own goes over it).
        secret = getattr(request.state, "client_secret", None)
        session, chosen_model = starting_session(secret, offer.session, chosen_model)
        manager = _manager(request)
        cluster: Cluster = request.app.state.cluster
        started: list[str] = []  # the call's id once it exists, for its registry entry

        def ended() -> None:
            slot.release()
            if started:
                cluster.call_ended(started[0])

        account = session_key(request, secret)
        try:
            call = await manager.create_call(offer.sdp, session, chosen_model, api_key=account, on_close=ended)
        except InvalidOffer as exc:
            raise APIError(400, str(exc), code="invalid_offer", param="sdp") from exc
        except ShuttingDown as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc
        except InvalidSessionConfig as exc:
            raise APIError(400, exc.message, code=getattr(exc, "code", None) or "invalid_value",
                           param=exc.param) from exc
    except BaseException:
        slot.release()
        raise
    slot.closer = functools.partial(call.close, "server draining")
    if secret is not None:
        request.app.state.client_secrets.claim_call(call, secret)
    if not call.closed:
        started.append(call.id)
        await cluster.claim(call.id, account, secret.digest if secret is not None else None)
    headers = {"Location": f"/v1/realtime/calls/{call.id}"}
    if wants_json(offer.dialect, request.headers.get("accept")):
        body = {"id": call.id, "sdp": call.answer_sdp, "ice_servers": manager.ice_servers()}
        return JSONResponse(body, status_code=200, headers=headers)
    return Response(call.answer_sdp, status_code=201, media_type=SDP_MEDIA_TYPE, headers=headers)


@router.post("/v1/realtime/calls/{call_id}/hangup", response_model=None)
async def hangup_call(call_id: str, request: Request) -> dict[str, Any] | Response:
    """End a call from the server side (the client sees its connection close).

    Another node's call (shared state) is hung up by its owner: the request is forwarded there.
    """
    call = _manager(request).get(call_id)
    cluster: Cluster = request.app.state.cluster
    if call is None and cluster.shared and FORWARDED_HEADER not in request.headers:
        owner = await cluster.owner_of(call_id)
        if owner is not None:
            return await cluster.forward_hangup(owner, call_id, request.headers)
    secret = getattr(request.state, "client_secret", None)
    if secret is not None:
        owned = request.app.state.client_secrets.owns_call(call, secret)
    else:  # the account that placed it (as for a sideband); anyone on an open server
        owned = call is None or session_key(request) == getattr(call.session, "api_key", None)
    if not owned:
        # A key may only end the calls it (or an ek it minted) made; others look as if they did not exist.
        raise APIError(404, f"Call '{call_id}' not found.", code="call_not_found", param="call_id")
    if not await _manager(request).hangup(call_id):
        raise APIError(404, f"Call '{call_id}' not found.", code="call_not_found", param="call_id")
    return {}


@router.get("/v1/realtime/ice-servers")
async def ice_servers(request: Request) -> dict[str, Any]:
    """STUN/TURN servers for the client's RTCPeerConnection (TURN credentials are fresh)."""
    return {"ice_servers": _manager(request).ice_servers()}
