"""State shared between nodes (ephemeral keys, rate-limit buckets, node and call registries)."""

from .base import (
    NODE_ID_RE,
    BucketResult,
    BucketStore,
    CallRecord,
    CallRegistry,
    NodeInfo,
    NodeRegistry,
    StateBackend,
    StateUnavailable,
)
from .memory import MemoryState

__all__ = [
    "NODE_ID_RE", "BucketResult", "BucketStore", "CallRecord", "CallRegistry", "MemoryState", "NodeInfo",
    "NodeRegistry", "StateBackend", "StateUnavailable", "open_state",
]


def open_state(url: str | None, *, prefix: str = "openrealtime:", timeout_s: float = 1.0) -> StateBackend:
    """The backend a `state_url` names: None/"" or "memory://" = this process, "redis://" / "rediss://"
    / "unix://" = Redis (or Valkey)."""
    if not url or url.startswith("memory:"):
        return MemoryState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisState  # imports redis only when it is used

        return RedisState(url, prefix=prefix, timeout_s=timeout_s)
    raise ValueError(f"state_url must start with redis://, rediss://, unix:// or memory://, not {url.split(':')[0]!r}")
