"""Two nodes sharing state through Redis, behind HAProxy with the repo's config (issue 15).

Everything real, on loopback: `redis-server`, two `openrealtime serve` processes (node-a, node-b)
with `state_url` pointing at it, and `haproxy -f deploy/haproxy.cfg` round-robin in front. The
checks go through the balancer and to each node directly: an ephemeral key minted on one node
opens a session on the other; one key's rate limit holds across both; a call is hung up and
controlled (sideband) through the node that does not own it; a Redis outage follows the
documented policy; a killed node's registry entries expire and the balancer sends everything to
the survivor; a draining node keeps its live call and refuses new ones.

The tests of this module run in file order and share the cluster; the last two restart or stop
node-a.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import websockets

from ..redis_server import RedisServer, require_redis_server
from .conftest import API_KEY, ARTIFACTS, Server, assert_valid_server_event, free_port, start_server, stop_server
from .webrtc_client import Peer, hangup, http, open_call

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
RATE_KEY = "sk-test-rate-limited"  # its own bucket: only the rate-limit test spends it
OTHER_KEY = "sk-test-someone-else"  # a valid key that owns none of the calls
TEXT_SESSION = {"type": "realtime", "output_modalities": ["text"]}
HEARTBEAT_S = 0.5  # entries expire after 3 missed heartbeats: 1.5 s
PREFIX = "openrealtime:"


def haproxy_path() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if path is None:
        message = "haproxy is not installed; install it with: apt-get install haproxy (scripts/install-system-deps.sh)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def port_of(server: Server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


@dataclass
class Cluster:
    redis: RedisServer
    nodes: dict[str, Server]  # node id -> its server (replaced when a node is restarted)
    lb: Server  # the balancer, as a Server (base_url, api key) for the request helpers
    lb_proc: subprocess.Popen

    def node_env(self, node_id: str) -> dict[str, str]:
        return node_env(self.redis, node_id)

    async def keys(self, pattern: str) -> list[str]:
        client = aioredis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            return sorted(await client.keys(PREFIX + pattern))
        finally:
            await client.aclose()

    async def wait_for(self, check: Any, what: str, wait_s: float = 10.0) -> None:
        """Poll an async check (Redis has no event to wait on for an expiry)."""
        for _ in range(int(wait_s / 0.2)):
            if await check():
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    async def get(self, key: str) -> Any:
        client = aioredis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            raw = await client.get(PREFIX + key)
            return None if raw is None else json.loads(raw)
        finally:
            await client.aclose()


def node_env(redis: RedisServer, node_id: str) -> dict[str, str]:
    return {
        "OPENREALTIME_STATE_URL": redis.url,
        "OPENREALTIME_NODE_ID": node_id,
        "OPENREALTIME_NODE_HEARTBEAT_S": str(HEARTBEAT_S),
        "OPENREALTIME_STATE_TIMEOUT_S": "0.5",
        "OPENREALTIME_API_KEYS": json.dumps([API_KEY, RATE_KEY, OTHER_KEY]),
        "OPENREALTIME_RATE_LIMIT_REQUESTS_PER_MIN": "3",
        "OPENREALTIME_DRAIN_GRACE_S": "20",
    }


def start_balancer(a: Server, b: Server) -> tuple[Server, subprocess.Popen]:
    port = free_port()
    log_path = ARTIFACTS / f"haproxy-{port}.log"
    env = {**os.environ, "LB_BIND": f"127.0.0.1:{port}", "NODE_A": f"127.0.0.1:{port_of(a)}", "NODE_A_ID": "node-a",
           "NODE_B": f"127.0.0.1:{port_of(b)}", "NODE_B_ID": "node-b"}
    proc = subprocess.Popen([haproxy_path(), "-db", "-f", str(HAPROXY_CFG)], env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    lb = Server(f"http://127.0.0.1:{port}", API_KEY, proc, log_path)
    return lb, proc


def wait_until(check: Any, what: str, wait_s: float = 20.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def ready(server: Server) -> bool:
    return httpx.get(f"{server.base_url}/readyz", timeout=2).status_code == 200


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_redis_server()
    haproxy_path()
    with RedisServer() as redis:
        a = start_server(node_env(redis, "node-a"), name="node-a")
        b = start_server(node_env(redis, "node-b"), name="node-b")
        lb, proc = start_balancer(a, b)
        nodes = {"node-a": a, "node-b": b}
        try:
            wait_until(lambda: ready(lb), "the balancer to answer /readyz")
            # Both servers up in HAProxy (rise 2 at 1 s): wait until both have answered through it.
            time.sleep(2.5)
            yield Cluster(redis, nodes, lb, proc)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            for server in nodes.values():
                if server.proc.poll() is None:
                    stop_server(server)
            for server in nodes.values():
                text = server.log_text()
                assert "Traceback" not in text, text[-4000:]


def owner(call_id: str) -> str:
    assert call_id.startswith("rtc_node-"), call_id
    return call_id.split("_")[1]


async def ws_json(ws: Any, wait_s: float = 30) -> dict[str, Any]:
    event = json.loads(await asyncio.wait_for(ws.recv(), wait_s))
    assert_valid_server_event(event)
    return event


async def ws_until(ws: Any, until: str, wait_s: float = 60) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(wait_s):
        while True:
            out.append(await ws_json(ws, wait_s))
            if out[-1]["type"] == until:
                return out


def connect(server: Server, key: str, query: str = "model=smollm2-135m") -> Any:
    return websockets.connect(f"{server.ws_url}/v1/realtime?{query}",
                              additional_headers={"Authorization": f"Bearer {key}"})


async def refusal(server: Server, key: str, query: str = "model=smollm2-135m") -> tuple[int, dict[str, Any]]:
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with connect(server, key, query):
            pass
    response = exc.value.response
    return response.status_code, json.loads(response.body)["error"]


async def call_via(server: Server) -> tuple[Peer, str]:
    peer, call_id, _ = await open_call(server, "json", session=TEXT_SESSION)
    return peer, call_id


async def assert_new_calls_land_on(cluster: Cluster, node_id: str, n: int) -> None:
    """`n` calls placed through the balancer are all owned by `node_id` (then hung up)."""
    peers: list[tuple[Peer, str]] = []
    try:
        for _ in range(n):
            peers.append(await call_via(cluster.lb))
        assert [owner(c) for _, c in peers] == [node_id] * n
    finally:
        for peer, call_id in peers:
            await hangup(cluster.lb, call_id)
            await peer.close()


async def still_talks(peer: Peer, instructions: str) -> None:
    """The call's session answers over its data channel (it is alive and served)."""
    peer.send({"type": "session.update", "session": {**TEXT_SESSION, "instructions": instructions}})
    updated = (await peer.collect("session.updated", 20))[-1]
    assert updated["session"]["instructions"] == instructions


# ------------------------------------------------------------------ shared state


async def test_an_ephemeral_key_minted_on_one_node_opens_a_session_on_the_other(cluster: Cluster):
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    async with http(a) as client:
        minted = await client.post("/v1/realtime/client_secrets", json={
            "session": {"type": "realtime", "instructions": "Answer like a pirate."}})
    assert minted.status_code == 200, minted.text
    ek = minted.json()["value"]
    keys = await cluster.keys("ek:*")
    assert keys and not any(ek in k for k in keys)  # stored under a digest, never the value
    for where in (b, cluster.lb, a):
        async with connect(where, ek) as ws:
            created = await ws_json(ws)
            assert created["type"] == "session.created"
            assert created["session"]["instructions"] == "Answer like a pirate."
    status, error = await refusal(b, "ek_" + "0" * 48)
    assert (status, error["code"]) == (401, "invalid_api_key")


async def test_a_per_key_rate_limit_holds_across_both_nodes(cluster: Cluster):
    """3 responses per minute for the key: A, A, B are answered, B's second is refused."""
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    create = json.dumps({"type": "response.create", "event_id": "evt_rate",
                         "response": {"output_modalities": ["text"], "max_output_tokens": 2}})
    remaining: list[int] = []
    for where, times in ((a, 2), (b, 1)):
        async with connect(where, RATE_KEY) as ws:
            await ws_until(ws, "session.created")
            for _ in range(times):
                await ws.send(create)
                done = (await ws_until(ws, "response.done"))[-1]
                assert done["response"]["status"] in ("completed", "incomplete"), done  # answered
                limits = (await ws_until(ws, "rate_limits.updated"))[-1]["rate_limits"]
                remaining.append(next(x["remaining"] for x in limits if x["name"] == "requests"))
    assert remaining == [2, 1, 0]  # one bucket for the key, whichever node answers
    async with connect(b, RATE_KEY) as ws:
        await ws_until(ws, "session.created")
        await ws.send(create)
        error = await ws_json(ws)
        assert error["type"] == "error", error
        assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["type"] == "requests"
        assert error["error"]["event_id"] == "evt_rate"
        with pytest.raises(TimeoutError):  # refused before response.created: nothing else follows
            await ws_json(ws, wait_s=1.5)
        # The session goes on: other events are still answered.
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}}))
        assert (await ws_until(ws, "session.updated"))[-1]["session"]["instructions"] == "x"
    async with connect(a, API_KEY) as ws:  # another key has its own bucket
        await ws_until(ws, "session.created")
        await ws.send(create)
        assert (await ws_until(ws, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")


async def test_a_call_is_hung_up_through_the_node_that_does_not_own_it(cluster: Cluster):
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    peer, call_id = await call_via(a)
    try:
        assert owner(call_id) == "node-a"
        record = await cluster.get(f"call:{call_id}")
        assert record is not None and record["node_id"] == "node-a"
        async with http(b, OTHER_KEY) as client:  # a key that did not place it: refused by the owner
            response = await client.post(f"/v1/realtime/calls/{call_id}/hangup")
        assert response.status_code == 404 and response.json()["error"]["code"] == "call_not_found", response.text
        assert not peer.closed.is_set()
        response = await hangup(b, call_id)
        assert response.status_code == 200 and response.json() == {}, response.text
        await asyncio.wait_for(peer.closed.wait(), 20)  # the peer on A sees its connection close
        for where in (b, a, cluster.lb):
            again = await hangup(where, call_id)
            assert again.status_code == 404 and again.json()["error"]["code"] == "call_not_found", again.text
        assert await cluster.get(f"call:{call_id}") is None
    finally:
        await peer.close()


async def test_a_sideband_on_the_other_node_sees_the_call_and_its_update_takes_effect(cluster: Cluster):
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    peer, call_id = await call_via(a)
    try:
        status, error = await refusal(b, OTHER_KEY, f"call_id={call_id}")  # the owner's refusal, relayed
        assert (status, error["code"]) == (403, "call_not_owned"), error
        status, error = await refusal(b, "sk-wrong", f"call_id={call_id}")  # B's own check
        assert (status, error["code"]) == (401, "invalid_api_key"), error
        async with connect(b, API_KEY, f"call_id={call_id}") as sideband:
            await sideband.send(json.dumps({"type": "session.update", "session": {
                **TEXT_SESSION, "instructions": "You answer for node A."}}))
            updated = (await ws_until(sideband, "session.updated"))[-1]
            assert updated["session"]["instructions"] == "You answer for node A."
            # It took effect on the call itself (on A): the caller sees the same session.
            assert (await peer.collect("session.updated"))[-1]["session"] == updated["session"]
            # The call's own events reach the sideband on B.
            peer.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there."}]}})
            added = (await ws_until(sideband, "conversation.item.added"))[-1]
            assert added["item"]["content"][0]["text"] == "Hello there."
        assert (await hangup(cluster.lb, call_id)).status_code == 200  # through the balancer, to its owner
        await asyncio.wait_for(peer.closed.wait(), 20)
    finally:
        await peer.close()


async def test_the_balancer_spreads_calls_and_routes_each_call_to_its_owner(cluster: Cluster):
    peers: list[tuple[Peer, str]] = []
    try:
        for _ in range(4):
            peers.append(await call_via(cluster.lb))
        assert sorted(owner(c) for _, c in peers) == ["node-a", "node-a", "node-b", "node-b"]
        entries = [await cluster.get(k.removeprefix(PREFIX)) for k in await cluster.keys("node:*")]
        assert [n["node_id"] for n in entries] == ["node-a", "node-b"]
        for peer, call_id in peers:
            assert (await hangup(cluster.lb, call_id)).status_code == 200
            await asyncio.wait_for(peer.closed.wait(), 20)
    finally:
        for peer, _ in peers:
            await peer.close()


async def test_with_redis_down_the_documented_policy_holds_and_everything_comes_back(cluster: Cluster):
    """Fail closed: no ephemeral keys (503 state_unavailable), responses refused
    (`rate_limit_unavailable`); live calls go on; after Redis is back (empty: it persisted nothing)
    the heartbeats write the registry again."""
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    async with http(a) as client:
        ek = (await client.post("/v1/realtime/client_secrets", json={})).json()["value"]
    peer, call_id = await call_via(a)
    try:
        cluster.redis.stop()
        async with http(a) as client:
            response = await client.post("/v1/realtime/client_secrets", json={})
        assert response.status_code == 503 and response.json()["error"]["code"] == "state_unavailable", response.text
        status, error = await refusal(b, ek)
        assert (status, error["code"]) == (503, "state_unavailable")
        async with connect(b, API_KEY) as ws:  # an API key needs no store to open a session
            await ws_until(ws, "session.created")
            await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
            error = await ws_json(ws)
            assert error["type"] == "error" and error["error"]["code"] == "rate_limit_unavailable", error
        await still_talks(peer, "Redis is down.")
        response = await hangup(b, call_id)  # the owner cannot be looked up
        assert response.status_code == 503 and response.json()["error"]["code"] == "state_unavailable"
        assert not peer.closed.is_set()

        cluster.redis.start()
        async def rewritten() -> bool:  # by the heartbeats: A's call and both nodes
            nodes = [k.removeprefix(PREFIX) for k in await cluster.keys("node:*")]
            return nodes == ["node:node-a", "node:node-b"] and await cluster.get(f"call:{call_id}") is not None

        await cluster.wait_for(rewritten, "the heartbeats to write the registry again")
        assert (await cluster.get(f"call:{call_id}"))["node_id"] == "node-a"
        async with http(b) as client:
            assert (await client.post("/v1/realtime/client_secrets", json={})).status_code == 200
        assert (await hangup(b, call_id)).status_code == 200
        await asyncio.wait_for(peer.closed.wait(), 20)
    finally:
        if not cluster.redis.running:
            cluster.redis.start()
        await peer.close()


# ------------------------------------------------------------------ losing and draining a node


async def test_a_killed_node_expires_from_the_registry_and_new_calls_land_on_the_other(cluster: Cluster):
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    peer, call_id = await call_via(a)
    try:
        assert await cluster.get(f"call:{call_id}") is not None
        a.proc.kill()
        a.proc.wait()
        async def gone() -> bool:
            return await cluster.get("node:node-a") is None and await cluster.get(f"call:{call_id}") is None

        await cluster.wait_for(gone, "node-a's entries to expire", 3 * HEARTBEAT_S + 5)
        assert await cluster.get("node:node-a") is None and await cluster.get(f"call:{call_id}") is None
        assert [k.removeprefix(PREFIX) for k in await cluster.keys("node:*")] == ["node:node-b"]
        response = await hangup(b, call_id)  # its owner is gone: no such call
        assert response.status_code == 404 and response.json()["error"]["code"] == "call_not_found"
        # HAProxy's health check takes node-a out (fall 2 at 1 s); every new call lands on node-b.
        await asyncio.sleep(2.5)
        await assert_new_calls_land_on(cluster, "node-b", 3)
    finally:
        await peer.close()
    # node-a comes back where the balancer expects it, for the drain test.
    cluster.nodes["node-a"] = start_server(cluster.node_env("node-a"), name="node-a-restarted", port=port_of(a))
    wait_until(lambda: ready(cluster.nodes["node-a"]), "node-a to be ready again")


async def test_a_draining_node_keeps_its_live_call_and_refuses_new_ones(cluster: Cluster):
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    await asyncio.sleep(2.5)  # the restarted node-a back in the balancer (rise 2 at 1 s)
    peer, call_id = await call_via(a)
    try:
        a.proc.send_signal(signal.SIGTERM)
        async def draining() -> bool:
            return bool(((await cluster.get("node:node-a")) or {}).get("draining"))

        await cluster.wait_for(draining, "node-a to say it is draining")
        assert (await cluster.get("node:node-a"))["draining"] is True
        async with http(a) as client:
            assert (await client.get("/readyz")).status_code == 503
        refused = Peer()
        try:
            async with http(a) as client:
                response = await client.post("/v1/realtime/calls", content=await refused.offer(),
                                             headers={"Content-Type": "application/sdp"})
        finally:
            await refused.close()
        assert response.status_code == 503 and response.json()["error"]["code"] == "draining", response.text
        await asyncio.sleep(2.5)  # out of the balancer's rotation (fall 2 at 1 s)
        await assert_new_calls_land_on(cluster, "node-b", 2)
        await still_talks(peer, "Still here while draining.")  # the live call goes on
        assert (await hangup(b, call_id)).status_code == 200  # forwarded to the draining owner
        await asyncio.wait_for(peer.closed.wait(), 20)
        assert await asyncio.to_thread(a.proc.wait, 20) == 0  # its last session ended: it exits
    finally:
        await peer.close()
