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

Secrets live in a `ClientSecretStore` keyed by the SHA-256 of the value (the value itself is never
stored). `MemoryClientSecretStore` serves one process; a shared store (e.g. Redis: `SET <digest>
<json> EX <ttl + grace>`, `GET <digest>`) implements the same three coroutines for several workers.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine import EngineContext, InvalidSessionConfig, RealtimeSession
from ..protocol.errors import ProtocolError, from_validation_error
from ..protocol.limits import loads_limited
from ..protocol.session import READ_ONLY_FIELDS, deep_merge
from .auth import require_key, session_key
from .errors import APIError

PREFIX = "ek_"
MIN_TTL_S = 10
MAX_TTL_S = 7200
MAX_REQUEST_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """What the server remembers about one ek (never the value itself)."""

    digest: str  # sha256 hex of the value
    created_at: int
    expires_at: int
    # The session config the request gave (read-only fields dropped); sessions start from it.
    session: dict[str, Any] | None = None
    # Who minted it, for rate limits: sessions made with the ek count against this account, so
    # minting many eks does not multiply a key's limits. None only for secrets stored before.
    account: str | None = None

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def to_json(self) -> str:
        return json.dumps({"digest": self.digest, "created_at": self.created_at,
                           "expires_at": self.expires_at, "session": self.session, "account": self.account})

    @classmethod
    def from_json(cls, text: str | bytes) -> ClientSecret:
        return cls(**json.loads(text))


def secret_digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


class StoreFull(Exception):
    """The store holds as many live secrets as it may."""


class ClientSecretStore(Protocol):
    """Where secrets live. `get` keeps answering for a while after expiry so that a late user is
    told "expired" rather than "unknown"."""

    async def add(self, secret: ClientSecret) -> None: ...  # may raise StoreFull

    async def get(self, digest: str) -> ClientSecret | None: ...

    async def close(self) -> None: ...


class MemoryClientSecretStore:
    """A bounded in-process store with expiry.

    Lookups are one dict access by digest: the time taken depends on a hash of what the caller
    sent, never on how much of a real secret it matches. Expired secrets are kept for `grace_s`
    (to say "expired"), then purged, at most every `purge_every_s` and whenever the store is full.
    """

    def __init__(self, max_entries: int = 10_000, grace_s: float = 3600.0, purge_every_s: float = 60.0,
                 clock: Callable[[], float] = time.time):
        self.max_entries = max_entries
        self.grace_s = grace_s
        self.purge_every_s = purge_every_s
        self._clock = clock
        self._by_digest: dict[str, ClientSecret] = {}
        self._last_purge = clock()

    def __len__(self) -> int:
        return len(self._by_digest)

    def purge(self, *, keep_grace: bool = True) -> int:
        """Drop expired secrets (only those past the grace period when `keep_grace`); returns how many."""
        now = self._clock()
        cutoff = now - (self.grace_s if keep_grace else 0.0)
        dead = [d for d, s in self._by_digest.items() if s.expires_at <= cutoff]
        for digest in dead:
            del self._by_digest[digest]
        self._last_purge = now
        return len(dead)

    def _maybe_purge(self) -> None:
        if self._clock() - self._last_purge >= self.purge_every_s:
            self.purge()

    async def add(self, secret: ClientSecret) -> None:
        self._maybe_purge()
        if len(self._by_digest) >= self.max_entries:
            self.purge(keep_grace=False)
            if len(self._by_digest) >= self.max_entries:
                raise StoreFull(f"{self.max_entries} client secrets are live")
        self._by_digest[secret.digest] = secret

    async def get(self, digest: str) -> ClientSecret | None:
        self._maybe_purge()
        return self._by_digest.get(digest)

    async def close(self) -> None:
        self._by_digest.clear()


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
        except StoreFull as exc:
            raise APIError(429, "Too many live client secrets on this server; try again later.",
                           type="rate_limit_error", code="too_many_client_secrets") from exc
        return value, secret

    async def resolve(self, value: str) -> ClientSecret:
        """The secret for a presented ek, or a 401 APIError (unknown or expired)."""
        secret = await self.store.get(secret_digest(value))
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
