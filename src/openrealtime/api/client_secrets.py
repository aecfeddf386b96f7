"""Ephemeral client secrets (`ek_...`): short-lived keys a browser uses instead of the real API key.

`POST /v1/realtime/client_secrets` (real API key) takes the hosted API's request,
``{"expires_after": {"anchor": "created_at", "seconds": N}, "session": {...}}`` (both optional), and
answers ``{"value": "ek_...", "expires_at": <unix s>, "session": <the effective session>}``.

Scope, enforced by `auth.py` (`EPHEMERAL_ROUTES`): an ek is accepted only to create sessions —
`POST /v1/realtime/calls` and the `/v1/realtime` WebSocket — plus `GET /v1/realtime/ice-servers`
(what a browser needs to place the call) and `POST /v1/realtime/calls/{id}/hangup` for a call made
with that same ek. Everywhere else, minting another ek included, it is refused with 403. Once
`expires_at` has passed it is refused with 401 (code `expired_api_key`); sessions already started go
on. A call or WebSocket made with an ek starts from the ek's session config, with the request's own
session (and `?model=`) merged over it.

Secrets live in a `ClientSecretStore` (state/secrets.py) keyed by the SHA-256 of the value (the
value itself is never stored): in memory for one node, in Redis (`state_url`) for several.
"""

from __future__ import annotations

import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine import EngineContext, InvalidSessionConfig, RealtimeSession
from ..protocol.errors import ProtocolError, from_validation_error
from ..protocol.limits import loads_limited
from ..protocol.session import READ_ONLY_FIELDS, deep_merge
from ..state import StateUnavailable
from ..state.secrets import (  # noqa: F401  (re-exported: where they used to live)
    ClientSecret,
    ClientSecretStore,
    MemoryClientSecretStore,
    StoreFull,
    secret_digest,
)
from .auth import require_key, session_key
from .errors import APIError

PREFIX = "ek_"
MIN_TTL_S = 10
MAX_TTL_S = 7200
MAX_REQUEST_BYTES = 1024 * 1024


def _store_down() -> APIError:
    return APIError(503, "Ephemeral keys cannot be minted or checked right now (the shared state store is "
                    "unreachable); try again shortly.", type="server_error", code="state_unavailable",
                    headers={"Retry-After": "5"})


class ClientSecrets:
    """Mints and resolves eks; remembers which calls each ek made (for hangup)."""

    def __init__(self, store: ClientSecretStore, ttl_s: int = 600, clock: Callable[[], float] = time.time):
        self.store = store
        self.ttl_s = ttl_s
        self._clock = clock
        self._call_owner: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    async def mint(self, session: dict[str, Any] | None = None, seconds: int | None = None,
                   account: str | None = None) -> tuple[str, ClientSecret]:
        now = int(self._clock())
        value = PREFIX + secrets.token_hex(24)
        stored = {k: v for k, v in session.items() if k not in READ_ONLY_FIELDS} if session else None
        secret = ClientSecret(secret_digest(value), now, now + (seconds or self.ttl_s), stored or None, account)
        try:
            await self.store.add(secret)
        except StateUnavailable as exc:
            raise _store_down() from exc
        except StoreFull as exc:
            raise APIError(429, "Too many live client secrets on this server; try again later.",
                           type="rate_limit_error", code="too_many_client_secrets") from exc
        return value, secret

    async def resolve(self, value: str) -> ClientSecret:
        """The secret for a presented ek, or a 401 APIError (unknown or expired)."""
        try:
            secret = await self.store.get(secret_digest(value))
        except StateUnavailable as exc:
            raise _store_down() from exc
        if secret is None:
            raise APIError(401, "Incorrect ephemeral key provided: it is unknown to this server (mint one with "
                           "POST /v1/realtime/client_secrets).", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if secret.expired(self._clock()):
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(secret.expires_at))
            raise APIError(401, f"The ephemeral key expired at {when}; mint a new one with "
                           "POST /v1/realtime/client_secrets.", code="expired_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return secret

    def claim_call(self, call: Any, secret: ClientSecret) -> None:
        self._call_owner[call] = secret.digest

    def owns_call(self, call: Any, secret: ClientSecret) -> bool:
        return call is not None and self._call_owner.get(call) == secret.digest

    async def close(self) -> None:
        await self.store.close()


def starting_session(secret: ClientSecret | None, session: dict[str, Any] | None, model: str | None
                     ) -> tuple[dict[str, Any] | None, str | None]:
    """The (session, model) a call or WebSocket made with `secret` starts from.

    The ek's session config is the base; `?model=` and then the request's own session go over it.
    """
    if secret is None or not secret.session:
        return session, model
    base = dict(secret.session)
    if model and base.get("type") != "transcription":  # a transcription session has no `model`
        base["model"] = model
    merged = deep_merge(base, session or {})
    chosen = merged.get("model")
    return merged, chosen if isinstance(chosen, str) and chosen else model


async def effective_session(ctx: EngineContext, session: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a session config exactly as a new session would; its wire form, or a 400 APIError."""
    try:
        rt = RealtimeSession(ctx, transport="websocket", initial_session=session)
    except InvalidSessionConfig as exc:
        raise APIError(400, exc.message, code=exc.code or "invalid_value", param=exc.param) from exc
    try:
        return rt.config.wire()
    finally:
        await rt.close()


# ------------------------------------------------------------------------------------------ route


class _ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"] = "created_at"
    seconds: int | None = Field(None, ge=MIN_TTL_S, le=MAX_TTL_S)  # None: the configured default


class _CreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_after: _ExpiresAfter | None = None
    session: dict[str, Any] | None = None


async def read_json_body(request: Request, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """The JSON object body (empty body = {}), or an OpenAI-shaped 400/413."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    body = await request.body()
    if len(body) > limit:
        raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    if not body.strip():
        return {}
    try:
        data = loads_limited(body)
    except ProtocolError as exc:
        raise APIError(400, exc.message, code=exc.code) from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_type")
    return data


def parse_create_request(data: dict[str, Any]) -> _CreateRequest:
    try:
        return _CreateRequest.model_validate(data)
    except ValidationError as exc:
        err = from_validation_error(exc, data)
        raise APIError(400, err.message, code=err.code, param=err.param) from None


async def mint_response(request: Request, data: dict[str, Any], account: str | None) -> dict[str, Any]:
    """Validate a create request, mint the ek for ``account``, and answer in the hosted API's shape."""
    parsed = parse_create_request(data)
    session = await effective_session(request.app.state.engine, parsed.session)
    service: ClientSecrets = request.app.state.client_secrets
    seconds = parsed.expires_after.seconds if parsed.expires_after is not None else None
    value, secret = await service.mint(parsed.session, seconds, account)
    return {"value": value, "expires_at": secret.expires_at, "session": session}


router = APIRouter()


@router.post("/v1/realtime/client_secrets", dependencies=[Depends(require_key)])
async def create_client_secret(request: Request) -> dict[str, Any]:
    """Mint an ephemeral key (real API key required; an ek cannot mint another)."""
    return await mint_response(request, await read_json_body(request), session_key(request))
