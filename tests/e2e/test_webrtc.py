"""An aiortc peer (and the openai SDK's signaling) against the real server process over WebRTC.

The client lives in `webrtc_client.py` (shared with the audio tests).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from .conftest import Server, assert_answered
from .webrtc_client import LOCATION, Peer, answer_of, hangup, http, open_call, wait_for_log

pytestmark = pytest.mark.e2e

DIALECTS = ["json", "json_accept_sdp", "sdp", "multipart"]


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
        assert_answered(done)
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
