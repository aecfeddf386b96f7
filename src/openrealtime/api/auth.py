"""API-key auth: `Authorization: Bearer|Basic <key>` and the browser WebSocket subprotocol."""

from __future__ import annotations

import base64
import hmac

from starlette.requests import HTTPConnection

from .errors import APIError

SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."


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
    """Raise a 401 APIError unless the request carries a valid key."""
    checker: KeyChecker = conn.app.state.keys
    if checker.open:
        return
    keys = presented_keys(conn)
    if not keys:
        raise APIError(401, "Missing API key. Send 'Authorization: Bearer <key>'.",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not any(checker.valid(k) for k in keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def require_key(conn: HTTPConnection) -> None:
    """FastAPI dependency form of `authenticate`."""
    authenticate(conn)
