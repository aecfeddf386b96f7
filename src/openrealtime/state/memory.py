"""The one-node state backend: everything in this process, nothing to install (the default)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .base import BucketResult, CallRecord, NodeInfo
from .secrets import MemoryClientSecretStore

# Keys whose buckets are all full again are forgotten once there are this many.
_MAX_KEYS = 10_000


class MemoryBucketStore:
    """`BucketStore` in a dict. A bucket is forgotten only once it is full again, so forgetting never
    gives a key more than it would have had."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # key -> name -> (level, stamp)
        self._buckets: dict[str, dict[str, tuple[float, float]]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    async def apply(self, key: str, limits: Mapping[str, int], *, check: bool = False,
                    charge: Mapping[str, float] | None = None) -> BucketResult:
        return self.apply_now(key, limits, check=check, charge=charge)

    def apply_now(self, key: str, limits: Mapping[str, int], *, check: bool = False,
                  charge: Mapping[str, float] | None = None) -> BucketResult:
        """`apply` without awaiting (the state is local): the engine's fast path."""
        now = self._clock()
        stored = self._buckets.get(key)
        if stored is None:
            if len(self._buckets) >= _MAX_KEYS:
                self._forget_full(now, limits)
            stored = self._buckets[key] = {}
        levels: dict[str, float] = {}
        for name, limit in limits.items():
            level, stamp = stored.get(name, (float(limit), now))
            levels[name] = min(float(limit), level + max(0.0, now - stamp) * limit / 60.0)
        if check:
            for name, level in levels.items():
                if level < 1.0:
                    for n, lv in levels.items():
                        stored[n] = (lv, now)
                    return BucketResult(levels, refused=name)
        for name, amount in (charge or {}).items():
            if name in levels:
                levels[name] -= amount
        for name, level in levels.items():
            stored[name] = (level, now)
        return BucketResult(levels)

    def _forget_full(self, now: float, limits: Mapping[str, int]) -> None:
        def full(buckets: dict[str, tuple[float, float]]) -> bool:
            return all(level + (now - stamp) * limits.get(name, 1) / 60.0 >= limits.get(name, 0)
                       for name, (level, stamp) in buckets.items())

        for key in [k for k, b in self._buckets.items() if full(b)]:
            del self._buckets[key]


class MemoryNodeRegistry:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}  # id -> (info, expires at)

    async def announce(self, node: NodeInfo, ttl_s: float) -> None:
        self._nodes[node.node_id] = (node, self._clock() + ttl_s)

    async def get(self, node_id: str) -> NodeInfo | None:
        entry = self._nodes.get(node_id)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def list(self) -> list[NodeInfo]:
        now = self._clock()
        return [info for _, (info, until) in sorted(self._nodes.items()) if until > now]

    async def withdraw(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)


class MemoryCallRegistry:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._calls: dict[str, tuple[CallRecord, float]] = {}

    async def claim(self, record: CallRecord, ttl_s: float) -> None:
        self._calls[record.call_id] = (record, self._clock() + ttl_s)

    async def refresh(self, records: list[CallRecord], ttl_s: float) -> None:
        now = self._clock()
        for call_id in [c for c, (_, until) in self._calls.items() if until <= now]:
            del self._calls[call_id]
        for record in records:
            self._calls[record.call_id] = (record, now + ttl_s)

    async def get(self, call_id: str) -> CallRecord | None:
        entry = self._calls.get(call_id)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def release(self, call_id: str) -> None:
        self._calls.pop(call_id, None)


class MemoryState:
    """`StateBackend` for one node."""

    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.secrets = MemoryClientSecretStore()
        self.buckets = MemoryBucketStore(clock)
        self.nodes = MemoryNodeRegistry(clock)
        self.calls = MemoryCallRegistry(clock)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        await self.secrets.close()
