"""Ephemeral client secrets against the real server process, with the official `openai` SDK.

An ek minted with `client.realtime.client_secrets.create(...)` opens a WebSocket session (SDK) and
a WebRTC call (aiortc, and the SDK's `calls.create`); both start from the ek's session config, under
the request's own. The ek is refused everywhere else, and once it has expired.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
import websockets
from openai import AsyncOpenAI

from .conftest import Server, collect
from .webrtc_client import LOCATION, Peer, answer_of, hangup, http, open_call

pytestmark = pytest.mark.e2e

EK_SESSION: dict[str, Any] = {
    "type": "realtime",
    "instructions": "You are the ek's assistant.",
    "output_modalities": ["text"],
    "temperature": 0.6,
    "audio": {"input": {"turn_detection": None}},
}


def sdk(server: Server, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=f"{server.base_url}/v1", websocket_base_url=f"{server.ws_url}/v1")


async def mint(server: Server, seconds: int = 600, session: dict[str, Any] | None = None) -> str:
    async with sdk(server, server.api_key) as client:
        secret = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": seconds}, session=session or EK_SESSION)  # type: ignore[arg-type]
    assert secret.value.startswith("ek_")
    assert abs(secret.expires_at - (time.time() + seconds)) < 5
    assert secret.session.type == "realtime"
    return secret.value


async def test_mint_with_the_sdk_and_open_a_websocket_session(server: Server):
    async with sdk(server, server.api_key) as client:
        secret = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 300}, session=EK_SESSION)  # type: ignore[arg-type]
    assert secret.session.instructions == EK_SESSION["instructions"]  # type: ignore[union-attr]
    async with sdk(server, secret.value) as client, client.realtime.connect(model="gpt-realtime") as conn:
        created = (await collect(conn, "session.created"))[0]["session"]
        assert created["instructions"] == EK_SESSION["instructions"]
        assert created["output_modalities"] == ["text"] and created["temperature"] == 0.6
        assert created["audio"]["input"]["turn_detection"] is None
        # A normal session from then on.
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]})
        await conn.response.create(response={"max_output_tokens": 8})
        done = (await collect(conn, "response.done"))[-1]
        assert done["response"]["status"] in ("completed", "incomplete")


async def test_webrtc_call_with_an_ek_starts_from_its_session(server: Server):
    ek = await mint(server)
    peer = Peer()
    offer = await peer.offer()
    async with http(server, key=ek) as client:
        # The request's own session goes over the ek's: temperature overridden, instructions kept.
        response = await client.post("/v1/realtime/calls", json={"sdp": offer, "session": {"temperature": 1.1}})
    call_id, sdp = answer_of("json", response)
    try:
        await peer.connect(sdp)
        created = await peer.next_event()
        assert created["type"] == "session.created"
        assert created["session"]["instructions"] == EK_SESSION["instructions"]
        assert created["session"]["temperature"] == 1.1
        assert created["session"]["output_modalities"] == ["text"]
        # The ek may hang up its own call.
        async with http(server, key=ek) as client:
            assert (await client.post(f"/v1/realtime/calls/{call_id}/hangup")).status_code == 200
        await asyncio.wait_for(peer.closed.wait(), 20)
    finally:
        await peer.close()


async def test_sdk_calls_create_with_an_ek_and_hangup_scope(server: Server):
    ek = await mint(server)
    other, other_id, _ = await open_call(server)  # a call made with the real key
    peer = Peer()
    try:
        async with sdk(server, ek) as client:
            result = await client.realtime.calls.create(sdp=await peer.offer())
            assert result.response.status_code == 201
            call_id = LOCATION.match(result.response.headers["location"]).group(1)  # type: ignore[union-attr]
            await peer.connect(result.text)
            created = await peer.next_event()
            assert created["session"]["instructions"] == EK_SESSION["instructions"]
            # Someone else's call: the ek cannot end it (it looks absent).
            with pytest.raises(openai.NotFoundError):
                await client.realtime.calls.hangup(other_id)
            await client.realtime.calls.hangup(call_id)
        await asyncio.wait_for(peer.closed.wait(), 20)
    finally:
        await peer.close()
        assert (await hangup(server, other_id)).status_code == 200
        await other.close()


async def test_ek_is_refused_outside_its_scope(server: Server):
    ek = await mint(server)
    async with sdk(server, ek) as client:
        with pytest.raises(openai.PermissionDeniedError) as exc:
            await client.models.list()
        assert exc.value.code == "ephemeral_key_not_allowed"
        with pytest.raises(openai.PermissionDeniedError):
            await client.realtime.client_secrets.create()
    async with http(server, key=ek) as client:
        assert (await client.get("/v1/voices")).status_code == 403
        assert (await client.get("/v1/realtime/ice-servers")).status_code == 200  # needed to place a call


async def test_bad_requests_are_rejected_by_the_sdk(server: Server):
    async with sdk(server, server.api_key) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.realtime.client_secrets.create(expires_after={"anchor": "created_at", "seconds": 5})
        assert exc.value.body["param"] == "expires_after.seconds"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as exc:
            await client.realtime.client_secrets.create(
                session={"type": "realtime", "audio": {"output": {"speed": 9}}})  # type: ignore[arg-type]
        assert exc.value.body["param"] == "session.audio.output.speed"  # type: ignore[index]


async def test_expired_ek_is_refused(server: Server):
    async with sdk(server, server.api_key) as client:
        secret = await client.realtime.client_secrets.create(expires_after={"anchor": "created_at", "seconds": 10})
    await asyncio.sleep(max(0.0, secret.expires_at - time.time()) + 1.0)
    peer = Peer()
    offer = await peer.offer()
    await peer.close()
    async with http(server, key=secret.value) as client:
        response = await client.post("/v1/realtime/calls", content=offer, headers={"Content-Type": "application/sdp"})
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "expired_api_key" and "expired" in error["message"]
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with websockets.connect(f"{server.ws_url}/v1/realtime?model=gpt-realtime",
                                      subprotocols=["realtime", f"openai-insecure-api-key.{secret.value}"]):  # type: ignore[list-item]
            pass
    assert denied.value.response.status_code == 401
    async with sdk(server, secret.value) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.realtime.calls.create(sdp=offer)
