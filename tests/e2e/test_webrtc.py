"""An aiortc peer (and the openai SDK's signaling) against the real server process over WebRTC.

The client is stock aiortc with no STUN server (loopback only): its host candidates are this
machine's interface addresses and the server answers with 127.0.0.1 from `ice.addresses`.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from aioice.ice import get_host_addresses
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from openai import AsyncOpenAI

from openrealtime.transports.webrtc import HostAddressPlan

from .conftest import Server, assert_valid_server_event

pytestmark = pytest.mark.e2e

DIALECTS = ["json", "json_accept_sdp", "sdp", "multipart"]
LOCATION = re.compile(r"^/v1/realtime/calls/(rtc_[A-Za-z0-9_]+)$")


class Peer:
    """A WebRTC client: microphone track (silence), `oai-events` channel, validated events."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: stay on loopback
        self.pc.addTrack(AudioStreamTrack())
        self.channel = self.pc.createDataChannel("oai-events")
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", self._events.put_nowait)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState in ("closed", "failed"):
            self.closed.set()

    async def offer(self) -> str:
        if not get_host_addresses(use_ipv4=True, use_ipv6=True):
            # Only loopback here (a network-less container): stock aiortc would offer no candidate.
            HostAddressPlan(["127.0.0.1"], gather_interfaces=False).apply(self.pc)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        await asyncio.wait_for(self.opened.wait(), 20)
        assert self.pc.connectionState == "connected"

    def send(self, event: dict[str, Any] | str) -> None:
        self.channel.send(event if isinstance(event, str) else json.dumps(event))

    async def next_event(self, wait_s: float = 30) -> dict[str, Any]:
        event = json.loads(await asyncio.wait_for(self._events.get(), wait_s))
        assert_valid_server_event(event)
        return event

    async def collect(self, until: str, wait_s: float = 90) -> list[dict[str, Any]]:
        """Events up to and including the first of type `until`."""
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(wait_s):
            while True:
                out.append(await self.next_event(wait_s))
                if out[-1]["type"] == until:
                    return out

    async def close(self) -> None:
        await self.pc.close()
        while not self._events.empty():  # whatever arrived unread must be valid too
            assert_valid_server_event(json.loads(self._events.get_nowait()))


def http(server: Server, key: str | None = "") -> httpx.AsyncClient:
    """A client with the server's key; `key=None` sends no Authorization header at all."""
    headers = {} if key is None else {"Authorization": f"Bearer {key or server.api_key}"}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30)


async def post_offer(server: Server, dialect: str, sdp: str,
                     session: dict | None = None) -> httpx.Response:
    async with http(server) as client:
        if dialect == "json":
            body: dict[str, Any] = {"sdp": sdp, **({"session": session} if session else {})}
            return await client.post("/v1/realtime/calls", json=body)
        if dialect == "json_accept_sdp":
            body = {"sdp": sdp, **({"session": session} if session else {})}
            return await client.post("/v1/realtime/calls", json=body, headers={"Accept": "application/sdp"})
        if dialect == "sdp":
            return await client.post("/v1/realtime/calls", content=sdp,
                                     headers={"Content-Type": "application/sdp"})
        files = {"sdp": (None, sdp, "application/sdp")}
        if session:
            files["session"] = (None, json.dumps(session), "application/json")
        return await client.post("/v1/realtime/calls", files=files)


def answer_of(dialect: str, response: httpx.Response) -> tuple[str, str]:
    """(call id, answer SDP) after checking the dialect's status, headers and body."""
    match = LOCATION.match(response.headers.get("location", ""))
    assert match, response.headers
    call_id = match.group(1)
    if dialect == "json":
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "sdp", "ice_servers"}
        assert body["id"] == call_id and isinstance(body["ice_servers"], list)
        sdp = body["sdp"]
    else:
        assert response.status_code == 201, response.text
        assert response.headers["content-type"].startswith("application/sdp")
        sdp = response.text
    assert sdp.startswith("v=0")
    assert re.search(r"^a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 \d+ typ host", sdp, re.M), sdp
    return call_id, sdp


async def open_call(server: Server, dialect: str = "sdp",
                    session: dict | None = None) -> tuple[Peer, str, dict[str, Any]]:
    """A connected peer, its call id and the `session.created` event (always the first)."""
    peer = Peer()
    try:
        response = await post_offer(server, dialect, await peer.offer(), session)
        call_id, sdp = answer_of(dialect, response)
        await peer.connect(sdp)
        created = await peer.next_event()
        assert created["type"] == "session.created"
    except BaseException:
        await peer.close()
        raise
    return peer, call_id, created


async def hangup(server: Server, call_id: str) -> httpx.Response:
    async with http(server) as client:
        return await client.post(f"/v1/realtime/calls/{call_id}/hangup")


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"type", "code", "message", "param"} and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


# ----------------------------------------------------------------------------- signaling dialects


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_call_in_each_dialect(server: Server, dialect: str):
    session = {"type": "realtime", "instructions": f"Dialect {dialect}."}
    peer, call_id, created = await open_call(server, dialect, session)
    try:
        if dialect != "sdp":  # a raw SDP body carries no session config
            assert created["session"]["instructions"] == f"Dialect {dialect}."
        peer.send({"type": "session.update", "event_id": "evt_1",
                   "session": {"type": "realtime", "instructions": "Be brief."}})
        updated = (await peer.collect("session.updated"))[-1]
        assert updated["session"]["instructions"] == "Be brief."
    finally:
        assert (await hangup(server, call_id)).status_code == 200
        await peer.close()


async def test_model_from_query_and_session(server: Server):
    peer = Peer()
    offer = await peer.offer()
    async with http(server) as client:
        response = await client.post("/v1/realtime/calls?model=smollm2-135m", content=offer,
                                     headers={"Content-Type": "application/sdp"})
    call_id, sdp = answer_of("sdp", response)
    try:
        await peer.connect(sdp)
        created = await peer.next_event()
        assert created["type"] == "session.created"
        assert created["session"]["model"] == "smollm2-135m"
    finally:
        await hangup(server, call_id)
        await peer.close()


# ----------------------------------------------------------------------------- conversation


async def test_text_turn_over_the_data_channel(server: Server):
    peer, call_id, _ = await open_call(server, "sdp")
    try:
        peer.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}})
        peer.send({"type": "response.create",
                   "response": {"output_modalities": ["text"], "max_output_tokens": 400}})
        events = await peer.collect("response.done")
        types = [e["type"] for e in events]
        assert "response.created" in types
        assert types.index("response.created") < types.index("response.output_text.delta")
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert "".join(deltas).strip()
        done = events[-1]["response"]
        assert done["status"] == "completed", done
        assert done["output"][0]["content"][0]["text"] == "".join(deltas)
        assert not [e for e in events if e["type"] == "error"], events
    finally:
        await hangup(server, call_id)
        await peer.close()


async def test_malformed_events_get_errors_and_the_call_goes_on(server: Server):
    peer, call_id, _ = await open_call(server, "json")
    try:
        peer.send("{this is not json")
        error = (await peer.collect("error"))[-1]["error"]
        assert error["code"] == "invalid_json"
        peer.send({"type": "no.such.event", "event_id": "evt_x"})
        error = (await peer.collect("error"))[-1]["error"]
        assert error["event_id"] == "evt_x"
        peer.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Still here."}})
        assert (await peer.collect("session.updated"))[-1]["session"]["instructions"] == "Still here."
    finally:
        await hangup(server, call_id)
        await peer.close()


# ----------------------------------------------------------------------------- ending calls


async def test_hangup_ends_the_call(server: Server):
    peer, call_id, _ = await open_call(server, "multipart")
    try:
        response = await hangup(server, call_id)
        assert response.status_code == 200 and response.json() == {}
        await asyncio.wait_for(peer.closed.wait(), 20)  # the client sees its connection close
        await wait_for_log(server, rf"call {call_id} ended \(hangup\)")
        assert_openai_error(await hangup(server, call_id), 404, "call_id")
    finally:
        await peer.close()


async def wait_for_log(server: Server, pattern: str, wait_s: float = 20) -> re.Match[str]:
    for _ in range(int(wait_s / 0.1)):
        if match := re.search(pattern, server.log_text()):
            return match
        await asyncio.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the server log")


async def test_client_disconnect_frees_the_call(server: Server):
    peer, call_id, _ = await open_call(server, "sdp")
    await peer.close()
    match = await wait_for_log(server, rf"call {call_id} ended \(([^)]*)\)")
    assert match.group(1) != "hangup"
    assert_openai_error(await hangup(server, call_id), 404, "call_id")


# ----------------------------------------------------------------------------- bad requests


async def test_bad_offers_are_400(server: Server):
    peer = Peer()
    offer = await peer.offer()
    await peer.close()
    async with http(server) as client:
        for content in ("hello", offer.split("m=")[0], offer.replace("m=audio", "m=video")):
            response = await client.post("/v1/realtime/calls", content=content,
                                         headers={"Content-Type": "application/sdp"})
            assert assert_openai_error(response, 400, "sdp")["type"] == "invalid_request_error"
        response = await client.post("/v1/realtime/calls", json={"sdp": "not an sdp"})
        assert_openai_error(response, 400, "sdp")
        response = await client.post("/v1/realtime/calls", content=b"{oops",
                                     headers={"Content-Type": "application/json"})
        assert_openai_error(response, 400)
        response = await client.post("/v1/realtime/calls", json={"session": {"type": "realtime"}})
        assert_openai_error(response, 400, "sdp")
        response = await client.post("/v1/realtime/calls", json={
            "sdp": offer, "session": {"type": "realtime", "audio": {"output": {"speed": 9}}}})
        error = assert_openai_error(response, 400)
        assert error["param"] and "speed" in error["param"]
        response = await client.post("/v1/realtime/calls", files={
            "sdp": (None, offer), "session": (None, "{not json")})
        assert_openai_error(response, 400, "session")
        response = await client.post("/v1/realtime/calls", content=b"\x89PNG",
                                     headers={"Content-Type": "image/png"})
        assert_openai_error(response, 415)
        assert_openai_error(await client.post("/v1/realtime/calls/rtc_nope/hangup"), 404, "call_id")


@pytest.mark.parametrize("key", [None, "sk-wrong"])
async def test_auth_is_required(server: Server, key: str | None):
    peer = Peer()
    offer = await peer.offer()
    await peer.close()
    async with http(server, key=key) as client:
        responses = [
            await client.post("/v1/realtime/calls", content=offer,
                              headers={"Content-Type": "application/sdp"}),
            await client.post("/v1/realtime/calls", json={"sdp": offer}),
            await client.post("/v1/realtime/calls/rtc_x/hangup"),
            await client.get("/v1/realtime/ice-servers"),
        ]
    for response in responses:
        assert_openai_error(response, 401)


async def test_ice_servers(server: Server):
    async with http(server) as client:
        response = await client.get("/v1/realtime/ice-servers")
    assert response.status_code == 200
    servers = response.json()["ice_servers"]
    assert isinstance(servers, list)
    for entry in servers:
        assert isinstance(entry["urls"], list) and entry["urls"]


# ----------------------------------------------------------------------------- the openai SDK


async def test_openai_sdk_calls_create(server: Server):
    client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key)
    for session in ({"type": "realtime", "instructions": "From the SDK."}, None):
        peer = Peer()
        try:
            kw: dict[str, Any] = {"session": session} if session else {}
            result = await client.realtime.calls.create(sdp=await peer.offer(), **kw)
            assert result.response.status_code == 201
            call_id = LOCATION.match(result.response.headers["location"]).group(1)  # type: ignore[union-attr]
            await peer.connect(result.text)
            created = await peer.next_event()
            assert created["type"] == "session.created"
            if session:
                assert created["session"]["instructions"] == "From the SDK."
            await client.realtime.calls.hangup(call_id)
            await asyncio.wait_for(peer.closed.wait(), 20)
        finally:
            await peer.close()
    await client.close()
