"""What nodes share: the protocols of the state backend and the records they hold.

One node needs nothing shared; several nodes behind a load balancer need the same answers on every
node: an ephemeral key minted on one opens a session on another, a key's rate limit is one bucket
for all nodes, and a hangup or a sideband connection that reaches the wrong node can find the node
that owns the call. `memory.py` answers for one process (the default); `redis.py` for many.

Every coroutine of a shared backend raises `StateUnavailable` when the store cannot be reached, so
each caller applies its documented policy (docs/deploy.md) instead of failing in some other way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .secrets import ClientSecretStore

# Node ids go into call ids (`rtc_<node>_<hex>`) and load-balancer rules: short, lower case, no `_`.
NODE_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")


class StateUnavailable(Exception):
    """The shared store did not answer (down, unreachable, timed out)."""


@dataclass(frozen=True, slots=True)
class BucketResult:
    """The outcome of one atomic bucket operation: levels after it, and which limit refused (if any)."""

    levels: dict[str, float]
    refused: str | None = None  # name of the first bucket below 1 when `check` was asked

    @property
    def ok(self) -> bool:
        return self.refused is None


class BucketStore(Protocol):
    """Token buckets that refill continuously at `limit` per minute up to `limit`.

    `apply` is one atomic step on all buckets of `key`: refill them to now (a bucket not seen
    before, or forgotten, starts full), then, if `check` and some bucket is below 1, refuse and
    charge nothing; otherwise subtract `charge` (levels may go below zero). The clock is the
    store's own, so nodes with skewed clocks still agree.
    """

    async def apply(self, key: str, limits: Mapping[str, int], *, check: bool = False,
                    charge: Mapping[str, float] | None = None) -> BucketResult: ...


@dataclass(slots=True)
class NodeInfo:
    """One node as the others see it; refreshed by its heartbeat, gone when that stops."""

    node_id: str
    url: str  # internal base URL other nodes forward to, e.g. http://10.0.0.5:8000
    ice_addresses: list[str] = field(default_factory=list)  # where its media is reachable
    active_sessions: int = 0
    max_sessions: int | None = None
    draining: bool = False
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeInfo:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


class NodeRegistry(Protocol):
    async def announce(self, node: NodeInfo, ttl_s: float) -> None:
        """Create or refresh the node's entry; it expires `ttl_s` after the last announce."""

    async def get(self, node_id: str) -> NodeInfo | None: ...

    async def list(self) -> list[NodeInfo]:
        """Live nodes (expired entries are not listed), by node id."""

    async def withdraw(self, node_id: str) -> None: ...


@dataclass(slots=True)
class CallRecord:
    """Which node owns a WebRTC call, and who may act on it."""

    call_id: str
    node_id: str
    account: str | None = None  # session_key of whoever placed it
    ek_digest: str | None = None  # the ephemeral key it was placed with, if any
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> CallRecord:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


class CallRegistry(Protocol):
    async def claim(self, record: CallRecord, ttl_s: float) -> None:
        """Record (or re-record) a call; it expires `ttl_s` later unless refreshed."""

    async def refresh(self, records: list[CallRecord], ttl_s: float) -> None:
        """Re-record the owner's live calls (a full write, so entries come back after a store restart)."""

    async def get(self, call_id: str) -> CallRecord | None: ...

    async def release(self, call_id: str) -> None: ...


class StateBackend(Protocol):
    """The four shared stores, and whether they are shared with other nodes at all."""

    shared: bool
    secrets: ClientSecretStore
    buckets: BucketStore
    nodes: NodeRegistry
    calls: CallRegistry

    async def ping(self) -> None:
        """Raise StateUnavailable unless the store answers."""

    async def close(self) -> None: ...
