"""API-key auth: `Authorization: Bearer|Basic <key>`, the browser WebSocket subprotocol, ephemeral keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from .errors import APIError

if TYPE_CHECKING:
    from .client_secrets import ClientSecret

SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."
# Ephemeral client secrets (api/client_secrets.py) start with this, and are accepted only on these
# routes, as (method, path template); every other route answers an ek with 403.
EPHEMERAL_PREFIX = "ek_"
EPHEMERAL_ROUTES = frozenset({
    ("POST", "/v1/realtime/calls"),
    ("POST", "/v1/realtime/calls/{call_id}/hangup"),  # only for a call made with the same ek (calls.py)
    ("GET", "/v1/realtime/ice-servers"),  # what a browser needs to place the call
    ("WEBSOCKET", "/v1/realtime"),
    ("WEBSOCKET", "/api/v1/realtime/session"),  # Inworld's URL for the same WebSocket session
})


class KeyChecker:
    """Checks presented keys against the configured ones in constant time.

    With no keys configured the server is open (the CLI then refuses non-loopback binds unless told).
    """

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    @property
    def open(self) -> bool:
        return not self._keys

    def valid(self, key: str | None) -> bool:
        if self.open:
            return True
        if not key:
            return False
        presented = key.encode()
        ok = False
        for k in self._keys:  # no early exit: timing does not reveal which key matched
            ok |= hmac.compare_digest(presented, k)
        return ok


def _from_basic(value: str) -> str:
    # Inworld-style clients send the key itself; RFC 7617 clients send base64("user:key").
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except Exception:
        return value
    return decoded.split(":", 1)[1] if ":" in decoded else decoded


def presented_keys(conn: HTTPConnection) -> list[str]:
    """Every key candidate the request carries (header, then WebSocket subprotocols)."""
    keys: list[str] = []
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        keys.append(value)
    elif scheme.lower() == "basic" and value:
        keys.append(value)
        keys.append(_from_basic(value))
    for proto in conn.headers.get("sec-websocket-protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(SUBPROTOCOL_KEY_PREFIX):
            keys.append(proto[len(SUBPROTOCOL_KEY_PREFIX):])
    return keys


def authenticate(conn: HTTPConnection) -> None:
    """Raise a 401 APIError unless the request carries a valid key (403 for an ephemeral key)."""
    checker: KeyChecker = conn.app.state.keys
    keys = presented_keys(conn)
    if any(k.startswith(EPHEMERAL_PREFIX) for k in keys) and not (
            not checker.open and any(checker.valid(k) for k in keys)):
        raise APIError(403, "Ephemeral keys (ek_...) can only create Realtime sessions (POST /v1/realtime/calls, "
                       "the /v1/realtime WebSocket) and hang up their own calls; use an API key for this "
                       "endpoint.", code="ephemeral_key_not_allowed")
    if checker.open:
        return
    if not keys:
        raise APIError(401, "Missing API key. Send 'Authorization: Bearer <key>'.",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not any(checker.valid(k) for k in keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def authenticate_session(conn: HTTPConnection) -> ClientSecret | None:
    """`authenticate` for routes that create sessions, which also take a live ephemeral key.

    Returns the ClientSecret when the caller used one (also left in `conn.state.client_secret`),
    None for an API key (or an open server); raises 401 for an unknown or expired ek.
    """
    checker: KeyChecker = conn.app.state.keys
    keys = presented_keys(conn)
    if not checker.open and any(checker.valid(k) for k in keys):
        return None
    ephemeral = [k for k in keys if k.startswith(EPHEMERAL_PREFIX)]
    service = getattr(conn.app.state, "client_secrets", None)
    if not ephemeral or service is None:
        authenticate(conn)
        return None
    secret = await service.resolve(ephemeral[0])
    conn.state.client_secret = secret
    return secret


def ephemeral_allowed(conn: HTTPConnection) -> bool:
    route = conn.scope.get("route")
    method = "WEBSOCKET" if conn.scope.get("type") == "websocket" else conn.scope.get("method", "")
    return (method, getattr(route, "path", None)) in EPHEMERAL_ROUTES


async def require_key(conn: HTTPConnection) -> None:
    """FastAPI dependency form of `authenticate` (of `authenticate_session` on EPHEMERAL_ROUTES)."""
    if ephemeral_allowed(conn):
        await authenticate_session(conn)
    else:
        authenticate(conn)


def session_key(conn: HTTPConnection, secret: ClientSecret | None = None) -> str | None:
    """Who a new session (or a minted ek) is accounted to for rate limits: a digest of the API key it
    presented, or for an ephemeral key the account that minted it; None on an open server."""
    if secret is not None:
        return secret.account or "ek:" + secret.digest
    checker: KeyChecker = conn.app.state.keys
    if checker.open:
        return None
    key = next((k for k in presented_keys(conn) if checker.valid(k)), None)
    return None if key is None else "key:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
