"""Where ephemeral client secrets live: only a digest of each value, with its expiry and session.

The store keeps answering for a while after expiry, so a late user is told "expired" rather than
"unknown". `MemoryClientSecretStore` serves one process; `redis.py` shares them between nodes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


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
