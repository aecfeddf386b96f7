"""The state backends against each other: the in-process one and Redis (a real redis-server).

Where the behaviour must be the same, each test runs on both; Redis alone is checked for what only
it has: key expiries, atomicity across separate clients (nodes), outages and restarts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from redis.asyncio import Redis

from openrealtime.state import CallRecord, MemoryState, NodeInfo, StateBackend, StateUnavailable, open_state
from openrealtime.state.redis import RedisState
from openrealtime.state.secrets import ClientSecret, secret_digest

from ..redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer() as server:
        yield server


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client, to look at what the backend wrote."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def rstate(redis_server: RedisServer) -> AsyncIterator[RedisState]:
    state = RedisState(redis_server.url, prefix=_prefix(), timeout_s=TIMEOUT_S)
    yield state
    await state.close()


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[StateBackend]:
    if request.param == "memory":
        backend: StateBackend = MemoryState()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        backend = RedisState(server.url, prefix=_prefix(), timeout_s=TIMEOUT_S)
    yield backend
    await backend.close()


# --- buckets -------------------------------------------------------------------------------------


async def test_fresh_bucket_starts_full_and_charges(state: StateBackend) -> None:
    first = await state.buckets.apply("k", {"requests": 10, "tokens": 1000}, charge={"requests": 1, "tokens": 250})
    assert first.ok
    assert first.levels["requests"] == pytest.approx(9, abs=0.01)
    assert first.levels["tokens"] == pytest.approx(750, abs=0.1)
    other = await state.buckets.apply("other", {"requests": 10})
    assert other.levels == {"requests": pytest.approx(10)}


async def test_check_refuses_at_zero_and_charges_nothing(state: StateBackend) -> None:
    limits = {"requests": 2, "tokens": 100}
    for _ in range(2):
        assert (await state.buckets.apply("k", limits, check=True, charge={"requests": 1, "tokens": 10})).ok
    refused = await state.buckets.apply("k", limits, check=True, charge={"requests": 1, "tokens": 10})
    assert refused.refused == "requests"
    assert refused.levels["requests"] < 1
    assert refused.levels["tokens"] == pytest.approx(80, abs=0.1)  # nothing charged
    after = await state.buckets.apply("k", limits)
    assert after.levels["tokens"] == pytest.approx(80, abs=0.1)


async def test_refused_names_the_first_empty_bucket_in_order(state: StateBackend) -> None:
    await state.buckets.apply("k", {"a": 10, "b": 5, "c": 5}, charge={"b": 5, "c": 5})
    result = await state.buckets.apply("k", {"a": 10, "c": 5, "b": 5}, check=True, charge={"a": 1})
    assert result.refused == "c"
    assert result.levels["a"] == pytest.approx(10)
    result = await state.buckets.apply("k", {"b": 5, "c": 5}, check=True)
    assert result.refused == "b"


async def test_refill_over_time(state: StateBackend) -> None:
    limits = {"requests": 600}  # 10 per second
    empty = await state.buckets.apply("k", limits, charge={"requests": 600})
    assert empty.levels["requests"] == pytest.approx(0, abs=0.2)
    await asyncio.sleep(0.3)
    refilled = await state.buckets.apply("k", limits)
    assert 2.5 <= refilled.levels["requests"] <= 5.0
    # Never above the limit, however long it waited.
    await state.buckets.apply("full", limits)
    await asyncio.sleep(0.1)
    assert (await state.buckets.apply("full", limits)).levels["requests"] == pytest.approx(600)


async def test_charges_go_below_zero_and_refill_from_there(state: StateBackend) -> None:
    limits = {"tokens": 600}
    result = await state.buckets.apply("k", limits, charge={"tokens": 1200.5})
    assert result.ok
    assert result.levels["tokens"] == pytest.approx(-600.5, abs=0.1)
    refused = await state.buckets.apply("k", limits, check=True, charge={"tokens": 1})
    assert refused.refused == "tokens"
    assert refused.levels["tokens"] == pytest.approx(-600.5, abs=0.5)


async def test_bucket_key_expires_when_full_again(rstate: RedisState, raw: Redis) -> None:
    await rstate.buckets.apply("k", {"tokens": 600, "requests": 60}, charge={"tokens": 1200, "requests": 1})
    key = rstate.prefix + "rl:k"
    fields = await raw.hgetall(key)
    assert set(fields) == {"tokens:level", "tokens:stamp", "requests:level", "requests:stamp"}
    # tokens: from -600 to 600 at 10/s = 120 s (requests: 1 s); plus 1 s.
    assert 120_000 <= await raw.pttl(key) <= 121_100
    # A key that is full again right away lives about a second.
    await rstate.buckets.apply("idle", {"requests": 60})
    assert 500 <= await raw.pttl(rstate.prefix + "rl:idle") <= 1_000


async def test_bucket_charges_are_atomic_across_nodes(redis_server: RedisServer) -> None:
    prefix = _prefix()
    nodes = [RedisState(redis_server.url, prefix=prefix, timeout_s=2.0) for _ in range(5)]
    try:
        results = await asyncio.gather(*(
            nodes[i % len(nodes)].buckets.apply("shared", {"requests": 10}, check=True, charge={"requests": 1})
            for i in range(50)
        ))
        assert sum(r.ok for r in results) == 10
        assert all(r.refused == "requests" for r in results if not r.ok)
    finally:
        for node in nodes:
            await node.close()


async def test_bucket_script_survives_a_flush(rstate: RedisState, raw: Redis) -> None:
    await rstate.buckets.apply("k", {"requests": 10}, charge={"requests": 1})
    await raw.script_flush()
    await raw.flushall()
    result = await rstate.buckets.apply("k", {"requests": 10}, charge={"requests": 1})
    assert result.levels["requests"] == pytest.approx(9, abs=0.01)  # the bucket was forgotten: full


# --- client secrets ------------------------------------------------------------------------------


def _secret(value: str, expires_in: int = 60) -> ClientSecret:
    now = int(time.time())
    return ClientSecret(digest=secret_digest(value), created_at=now, expires_at=now + expires_in,
                        session={"type": "realtime", "instructions": "hi"}, account="acct-1")


async def test_secrets_round_trip(state: StateBackend) -> None:
    secret = _secret("ek_roundtrip")
    await state.secrets.add(secret)
    assert await state.secrets.get(secret.digest) == secret
    assert await state.secrets.get(secret_digest("ek_unknown")) is None


async def test_expired_secret_is_still_known(state: StateBackend) -> None:
    secret = _secret("ek_expired", expires_in=-5)
    await state.secrets.add(secret)
    found = await state.secrets.get(secret.digest)
    assert found is not None and found.expired(time.time())


async def test_secret_ttl_includes_grace_and_value_is_not_stored(rstate: RedisState, raw: Redis) -> None:
    value = "ek_" + uuid.uuid4().hex
    secret = _secret(value, expires_in=60)
    await rstate.secrets.add(secret)
    key = rstate.prefix + "ek:" + secret.digest
    assert 3650 <= await raw.ttl(key) <= 3661
    keys = [k async for k in raw.scan_iter(match=rstate.prefix + "*")]
    assert keys == [key]
    for k in keys:
        assert value not in k
        assert value not in (await raw.get(k) or "")


# --- nodes ---------------------------------------------------------------------------------------


def _node(node_id: str, *, draining: bool = False) -> NodeInfo:
    return NodeInfo(node_id=node_id, url=f"http://{node_id}:8000", ice_addresses=["10.0.0.1"],
                    active_sessions=1, max_sessions=8, draining=draining, updated_at=time.time())


async def test_nodes_announce_get_list_withdraw(state: StateBackend) -> None:
    nodes = {node_id: _node(node_id) for node_id in ("node-c", "node-a", "node-b")}
    for node in nodes.values():
        await state.nodes.announce(node, ttl_s=10)
    assert await state.nodes.get("node-a") == nodes["node-a"]
    assert await state.nodes.list() == [nodes["node-a"], nodes["node-b"], nodes["node-c"]]
    draining = _node("node-b", draining=True)
    await state.nodes.announce(draining, ttl_s=10)
    assert await state.nodes.get("node-b") == draining
    await state.nodes.withdraw("node-b")
    assert await state.nodes.get("node-b") is None
    assert [n.node_id for n in await state.nodes.list()] == ["node-a", "node-c"]
    await state.nodes.withdraw("node-unknown")  # no error
    assert await state.nodes.get("node-unknown") is None


async def test_nodes_expire(state: StateBackend) -> None:
    await state.nodes.announce(_node("node-short"), ttl_s=0.3)
    await state.nodes.announce(_node("node-long"), ttl_s=10)
    assert [n.node_id for n in await state.nodes.list()] == ["node-long", "node-short"]
    await asyncio.sleep(0.4)
    assert await state.nodes.get("node-short") is None
    assert [n.node_id for n in await state.nodes.list()] == ["node-long"]
    await state.nodes.announce(_node("node-short"), ttl_s=10)  # back with its next heartbeat
    assert [n.node_id for n in await state.nodes.list()] == ["node-long", "node-short"]


async def test_node_list_prunes_expired_ids(rstate: RedisState, raw: Redis) -> None:
    await rstate.nodes.announce(_node("node-a"), ttl_s=0.2)
    await rstate.nodes.announce(_node("node-b"), ttl_s=10)
    assert await raw.smembers(rstate.prefix + "nodes") == {"node-a", "node-b"}
    assert 9000 <= await raw.pttl(rstate.prefix + "node:node-b") <= 10_000
    await asyncio.sleep(0.3)
    assert [n.node_id for n in await rstate.nodes.list()] == ["node-b"]
    assert await raw.smembers(rstate.prefix + "nodes") == {"node-b"}
    await rstate.nodes.withdraw("node-b")
    assert await raw.exists(rstate.prefix + "nodes", rstate.prefix + "node:node-b") == 0
    assert await rstate.nodes.list() == []


# --- calls ---------------------------------------------------------------------------------------


def _call(call_id: str, node_id: str = "node-a") -> CallRecord:
    return CallRecord(call_id=call_id, node_id=node_id, account="acct-1", ek_digest=secret_digest("ek_x"),
                      created_at=time.time())


async def test_calls_claim_get_release(state: StateBackend) -> None:
    record = _call("rtc_node-a_01")
    await state.calls.claim(record, ttl_s=10)
    assert await state.calls.get(record.call_id) == record
    moved = _call("rtc_node-a_01", node_id="node-b")
    await state.calls.claim(moved, ttl_s=10)
    assert await state.calls.get(record.call_id) == moved
    await state.calls.release(record.call_id)
    assert await state.calls.get(record.call_id) is None
    await state.calls.release(record.call_id)  # twice is fine
    assert await state.calls.get("rtc_node-a_unknown") is None


async def test_calls_expire_unless_refreshed(state: StateBackend) -> None:
    short, kept = _call("rtc_node-a_short"), _call("rtc_node-a_kept")
    await state.calls.claim(short, ttl_s=0.3)
    await state.calls.claim(kept, ttl_s=0.3)
    await asyncio.sleep(0.2)
    await state.calls.refresh([kept], ttl_s=0.3)
    await asyncio.sleep(0.2)
    assert await state.calls.get(short.call_id) is None
    assert await state.calls.get(kept.call_id) == kept
    await state.calls.refresh([], ttl_s=1)  # nothing to do


async def test_refresh_restores_calls_after_flushall(rstate: RedisState, raw: Redis) -> None:
    records = [_call(f"rtc_node-a_{i:02d}") for i in range(3)]
    for record in records:
        await rstate.calls.claim(record, ttl_s=10)
    await raw.flushall()
    assert await rstate.calls.get(records[0].call_id) is None
    await rstate.calls.refresh(records, ttl_s=10)
    for record in records:
        assert await rstate.calls.get(record.call_id) == record
        assert 9000 <= await raw.pttl(rstate.prefix + "call:" + record.call_id) <= 10_000


# --- outages -------------------------------------------------------------------------------------


def _every_call(state: RedisState) -> dict[str, Callable[[], Awaitable[object]]]:
    """One coroutine factory per kind of call, to run while the store is down."""
    secret, node, record = _secret("ek_outage"), _node("node-a"), _call("rtc_node-a_outage")
    return {
        "ping": state.ping,
        "secrets.add": lambda: state.secrets.add(secret),
        "secrets.get": lambda: state.secrets.get(secret.digest),
        "buckets.apply": lambda: state.buckets.apply("k", {"requests": 10}, check=True, charge={"requests": 1}),
        "nodes.announce": lambda: state.nodes.announce(node, 10),
        "nodes.get": lambda: state.nodes.get("node-a"),
        "nodes.list": state.nodes.list,
        "nodes.withdraw": lambda: state.nodes.withdraw("node-a"),
        "calls.claim": lambda: state.calls.claim(record, 10),
        "calls.refresh": lambda: state.calls.refresh([record], 10),
        "calls.get": lambda: state.calls.get(record.call_id),
        "calls.release": lambda: state.calls.release(record.call_id),
    }


async def test_unavailable_while_down_and_back_after_restart() -> None:
    require_redis_server()
    with RedisServer() as server:
        state = RedisState(server.url, prefix=_prefix(), timeout_s=TIMEOUT_S)
        try:
            calls = _every_call(state)
            for call in calls.values():
                await call()  # connected, all work
            server.stop()
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(StateUnavailable) as caught:
                    await call()
                assert time.monotonic() - started < 2 * TIMEOUT_S, name
                assert caught.value.__cause__ is not None, name
            server.start()
            for call in calls.values():
                await call()  # reconnected
            assert (await state.buckets.apply("fresh", {"requests": 10})).ok
        finally:
            await state.close()


async def test_unavailable_when_the_store_hangs() -> None:
    require_redis_server()
    with RedisServer() as server:
        state = RedisState(server.url, prefix=_prefix(), timeout_s=TIMEOUT_S)
        try:
            await state.ping()
            server.pause()
            for call in (state.ping, lambda: state.buckets.apply("k", {"requests": 10}, check=True),
                         lambda: state.calls.get("rtc_node-a_x")):
                started = time.monotonic()
                with pytest.raises(StateUnavailable):
                    await call()
                assert time.monotonic() - started < 2 * TIMEOUT_S + 0.2
            server.resume()
            await state.ping()
            assert (await state.buckets.apply("k", {"requests": 10})).ok
        finally:
            server.resume()
            await state.close()


async def test_constructing_does_no_io() -> None:
    state = RedisState("redis://127.0.0.1:1/0", timeout_s=TIMEOUT_S)  # nothing listens on port 1
    with pytest.raises(StateUnavailable):
        await state.ping()
    await state.close()


# --- open_state ----------------------------------------------------------------------------------


async def test_open_state_picks_the_backend_by_url() -> None:
    for url in (None, "", "memory://"):
        assert isinstance(open_state(url), MemoryState)
    for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/openrealtime-none.sock"):
        backend = open_state(url, prefix="x:", timeout_s=0.2)
        assert isinstance(backend, RedisState) and backend.shared and backend.prefix == "x:"
        await backend.close()
    for url in ("http://127.0.0.1:6379", "valkey://x", "postgres://x"):
        with pytest.raises(ValueError, match="state_url"):
            open_state(url)
