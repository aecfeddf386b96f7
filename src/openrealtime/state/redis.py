"""The multi-node state backend: Redis or Valkey, shared by every node behind the load balancer.

Only plain commands every Valkey also has (strings with expiry, sets, hashes, MGET, PEXPIRE and
Lua via EVALSHA/EVAL) are used: no modules, no Redis Functions, no client-side caching. Every
entry expires by itself, so nothing needs cleaning up when a node dies, and nothing but the
entries' own writes is needed to rebuild them after the store restarts empty.

Every coroutine raises `StateUnavailable` (the cause chained) when the store cannot be reached or
answers with an error, so callers apply their documented policy. redis-py reconnects on the next
call once the store is back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .base import BucketResult, CallRecord, NodeInfo, StateUnavailable
from .secrets import ClientSecret

__all__ = ["RedisBucketStore", "RedisCallRegistry", "RedisClientSecretStore", "RedisNodeRegistry", "RedisState"]


@contextmanager
def _reachable(action: str) -> Iterator[None]:
    """Turn whatever the client raises into `StateUnavailable`, one exception type for every caller."""
    try:
        yield
    except (RedisError, OSError) as exc:  # OSError covers refused/reset sockets and TimeoutError
        raise StateUnavailable(f"state store: {action} failed: {exc}") from exc


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _px(ttl_s: float) -> int:
    """A PX argument: whole milliseconds, at least 1 (callers delete instead of writing a ttl <= 0)."""
    return max(1, math.ceil(ttl_s * 1000.0))


class RedisClientSecretStore:
    """`ClientSecretStore` in Redis: `<prefix>ek:<digest>` -> the secret's JSON (never the ek value).

    Each entry lives until `grace_s` after the secret expires, so a late user hears "expired", not
    "unknown", then Redis drops it. It never raises StoreFull: how much Redis may hold is its own
    memory policy (`maxmemory`), not a count kept here.
    """

    def __init__(self, client: Redis, prefix: str, grace_s: float = 3600.0) -> None:
        self._client = client
        self._prefix = prefix + "ek:"
        self.grace_s = grace_s

    async def add(self, secret: ClientSecret) -> None:
        ttl = max(1, math.ceil(secret.expires_at - time.time() + self.grace_s))
        with _reachable("storing a client secret"):
            await self._client.set(self._prefix + secret.digest, secret.to_json(), ex=ttl)

    async def get(self, digest: str) -> ClientSecret | None:
        with _reachable("looking up a client secret"):
            raw = await self._client.get(self._prefix + digest)
        return None if raw is None else ClientSecret.from_json(raw)

    async def close(self) -> None:
        """Nothing to do: the connection pool is shared and closed by `RedisState.close`."""


# One atomic step on all buckets of a key, on the server's clock (nodes' clocks may disagree).
# KEYS[1] = the key's hash; ARGV = check ("1"/"0"), then (name, limit, charge) per bucket in the
# caller's order, so "refused" is the first empty bucket in that order. The hash keeps
# `<name>:level` and `<name>:stamp` (seconds, microsecond resolution). Levels are formatted with
# %.17g so they survive the trip through strings exactly; Lua's numbers are doubles, which hold
# today's epoch in microseconds exactly. The key expires once every bucket is full again (+1 s):
# by then forgetting it is the same as keeping it, and idle callers leave nothing behind.
_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local check = ARGV[1] == '1'
local n = (#ARGV - 1) / 3
local stored = {}
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do stored[raw[i]] = raw[i + 1] end
local names, limits, charges, levels = {}, {}, {}, {}
for i = 1, n do
  local name = ARGV[3 * i - 1]
  local limit = tonumber(ARGV[3 * i])
  local level = tonumber(stored[name .. ':level'])
  local stamp = tonumber(stored[name .. ':stamp'])
  if level == nil or stamp == nil then
    level = limit
    stamp = now
  end
  local elapsed = now - stamp
  if elapsed < 0 then elapsed = 0 end
  names[i] = name
  limits[i] = limit
  charges[i] = tonumber(ARGV[3 * i + 1])
  levels[i] = math.min(limit, level + elapsed * limit / 60)
end
local refused = 0
if check then
  for i = 1, n do
    if levels[i] < 1 then
      refused = i
      break
    end
  end
end
if refused == 0 then
  for i = 1, n do levels[i] = levels[i] - charges[i] end
end
local reply = {refused}
if n == 0 then return reply end
local fields = {}
local stamp = string.format('%.6f', now)
local until_full = 0
for i = 1, n do
  local level = string.format('%.17g', levels[i])
  fields[#fields + 1] = names[i] .. ':level'
  fields[#fields + 1] = level
  fields[#fields + 1] = names[i] .. ':stamp'
  fields[#fields + 1] = stamp
  reply[#reply + 1] = level
  if limits[i] > 0 and levels[i] < limits[i] then
    local need = (limits[i] - levels[i]) * 60 / limits[i]
    if need > until_full then until_full = need end
  end
end
redis.call('HSET', KEYS[1], unpack(fields))
local ms = math.ceil((until_full + 1) * 1000)
if ms > 10000000000 then ms = 10000000000 end
redis.call('PEXPIRE', KEYS[1], string.format('%d', ms))
return reply
"""


class RedisBucketStore:
    """`BucketStore` in Redis: one hash per key, updated by one Lua script so that every node's
    check-and-charge is a single atomic step (no two nodes can spend the same token)."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix + "rl:"
        self._script = client.register_script(_BUCKET_LUA)  # EVALSHA, EVAL-loaded again after a flush

    async def apply(self, key: str, limits: Mapping[str, int], *, check: bool = False,
                    charge: Mapping[str, float] | None = None) -> BucketResult:
        charge = charge or {}
        names = list(limits)
        args: list[str | int | float] = ["1" if check else "0"]
        for name in names:
            args += [name, repr(float(limits[name])), repr(float(charge.get(name, 0.0)))]
        with _reachable("applying a rate limit"):
            reply: list[Any] = await self._script(keys=[self._prefix + key], args=args)
        refused = int(reply[0])
        levels = {name: float(level) for name, level in zip(names, reply[1:], strict=True)}
        return BucketResult(levels, refused=names[refused - 1] if refused else None)


# Drop from the set the ids whose entry has expired, atomically per id, so that a node announcing
# itself at that moment (SET, then SADD) is never dropped. KEYS[1] = the set, KEYS[i+1] = ARGV[i]'s entry.
_PRUNE_LUA = """
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""


class RedisNodeRegistry:
    """`NodeRegistry` in Redis: `<prefix>node:<id>` -> the node's JSON with a PX expiry (its
    heartbeat), plus the set `<prefix>nodes` of ids so that `list` needs no key scan."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._client = client
        self._node = prefix + "node:"
        self._set = prefix + "nodes"
        self._prune = client.register_script(_PRUNE_LUA)

    async def announce(self, node: NodeInfo, ttl_s: float) -> None:
        if ttl_s <= 0:  # already expired, as the memory registry would see it
            await self.withdraw(node.node_id)
            return
        with _reachable("announcing the node"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self._node + node.node_id, node.to_json(), px=_px(ttl_s))
                pipe.sadd(self._set, node.node_id)
                await pipe.execute()

    async def get(self, node_id: str) -> NodeInfo | None:
        with _reachable("looking up a node"):
            raw = await self._client.get(self._node + node_id)
        return None if raw is None else NodeInfo.from_json(raw)

    async def list(self) -> list[NodeInfo]:
        with _reachable("listing the nodes"):
            ids = sorted(_text(i) for i in await self._client.smembers(self._set))
            if not ids:
                return []
            raws = await self._client.mget([self._node + i for i in ids])
            gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:
                await self._prune(keys=[self._set, *(self._node + i for i in gone)], args=gone)
        return [NodeInfo.from_json(raw) for raw in raws if raw is not None]

    async def withdraw(self, node_id: str) -> None:
        with _reachable("withdrawing the node"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.delete(self._node + node_id)
                pipe.srem(self._set, node_id)
                await pipe.execute()


class RedisCallRegistry:
    """`CallRegistry` in Redis: `<prefix>call:<id>` -> the record's JSON with a PX expiry.

    `refresh` rewrites each record whole (not just its expiry), so the owner's heartbeat restores
    its calls after the store restarts empty or is flushed.
    """

    def __init__(self, client: Redis, prefix: str) -> None:
        self._client = client
        self._call = prefix + "call:"

    async def claim(self, record: CallRecord, ttl_s: float) -> None:
        await self.refresh([record], ttl_s)

    async def refresh(self, records: list[CallRecord], ttl_s: float) -> None:
        if not records:
            return
        with _reachable("recording calls"):
            async with self._client.pipeline(transaction=False) as pipe:
                for record in records:
                    if ttl_s <= 0:
                        pipe.delete(self._call + record.call_id)
                    else:
                        pipe.set(self._call + record.call_id, record.to_json(), px=_px(ttl_s))
                await pipe.execute()

    async def get(self, call_id: str) -> CallRecord | None:
        with _reachable("looking up a call"):
            raw = await self._client.get(self._call + call_id)
        return None if raw is None else CallRecord.from_json(raw)

    async def release(self, call_id: str) -> None:
        with _reachable("releasing a call"):
            await self._client.delete(self._call + call_id)


class RedisState:
    """`StateBackend` for several nodes sharing one Redis (or Valkey).

    Constructing does no I/O (the app builds it synchronously at startup); the pool connects on
    first use. Each command may take `timeout_s` to connect and `timeout_s` to answer; a broken
    pooled connection (the store restarted) is retried once, at once, on a fresh one, and nothing
    else is retried, so a call fails with `StateUnavailable` within about twice `timeout_s`.
    A retried bucket step whose reply was lost may charge twice: that refuses more, never less.

    `client` (for tests) replaces `url`; `close` closes it either way.
    """

    shared = True

    def __init__(self, url: str | None = None, *, prefix: str = "openrealtime:", timeout_s: float = 1.0,
                 client: Redis | None = None) -> None:
        if client is None:
            if not url:
                raise ValueError("RedisState needs a url or a client")
            client = Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        self.client = client
        self.prefix = prefix
        self.secrets = RedisClientSecretStore(client, prefix)
        self.buckets = RedisBucketStore(client, prefix)
        self.nodes = RedisNodeRegistry(client, prefix)
        self.calls = RedisCallRegistry(client, prefix)

    async def ping(self) -> None:
        with _reachable("ping"):
            await self.client.ping()

    async def close(self) -> None:
        with _reachable("closing the connection pool"):
            await self.client.aclose()
