"""The sideband WebSocket (`GET /v1/realtime?call_id=`): a server-side controller on a WebRTC call.

The caller talks over its data channel; the controller (the official SDK's `connect(call_id=...)`)
sets the tools, sees the model's function call and answers it, and the caller hears the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from openrealtime.transports.sideband import MAX_SIDEBANDS_PER_CALL

from .conftest import Server, assert_answered, assert_valid_server_event, client, collect, start_server, stop_server
from .test_tools import RESULT, WEATHER, user
from .webrtc_client import Peer, hangup, http, open_call

pytestmark = pytest.mark.e2e

TEXT_SESSION = {"type": "realtime", "output_modalities": ["text"]}


def sideband_url(server: Server, call_id: str) -> str:
    return f"{server.ws_url}/v1/realtime?call_id={call_id}"


async def denial(url: str, key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with websockets.connect(url, additional_headers=headers):
            pass
    response = exc.value.response
    return response.status_code, json.loads(response.body)["error"]


async def next_json(ws: websockets.ClientConnection, wait_s: float = 30) -> dict[str, Any]:
    event = json.loads(await asyncio.wait_for(ws.recv(), wait_s))
    assert_valid_server_event(event)
    return event


async def test_sideband_answers_the_tool_call_of_a_browser_call(server: Server):
    peer, call_id, _ = await open_call(server, "json", session=TEXT_SESSION)
    try:
        async with client(server).realtime.connect(call_id=call_id) as sideband:
            await sideband.session.update(session={
                **TEXT_SESSION, "tools": [WEATHER], "tool_choice": "required",
                "instructions": "You are a weather assistant. Use the tools."})
            updated = (await collect(sideband, "session.updated"))[-1]
            assert [t["name"] for t in updated["session"]["tools"]] == ["get_weather"]
            assert (await peer.collect("session.updated"))[-1] == updated  # the caller sees it too

            peer.send({"type": "conversation.item.create", "item": user("What's the weather in Paris?")})
            peer.send({"type": "response.create",
                       "response": {"tool_choice": "required", "output_modalities": ["text"]}})
            events = await collect(sideband, "response.done")
            assert events[0]["type"] == "conversation.item.added"  # the caller's item, seen by the sideband
            assert not any(e["type"] == "session.created" for e in events)
            response = events[-1]["response"]
            (call,) = [o for o in response["output"] if o["type"] == "function_call"]
            assert call["name"] == "get_weather"
            caller_done = (await peer.collect("response.done"))[-1]
            assert caller_done == events[-1]  # the same event on both

            await sideband.conversation.item.create(item={
                "type": "function_call_output", "call_id": call["call_id"], "output": RESULT})
            # Both sides are read at once: the SDK's socket stops reading (pongs included) once 16
            # messages wait, so a sideband left unread through a long answer dies of a ping timeout.
            await sideband.response.create(response={"tool_choice": "none", "output_modalities": ["text"],
                                                     "max_output_tokens": 300})
            caller_events, sideband_events = await asyncio.gather(
                peer.collect("response.done"), collect(sideband, "response.done"))
            answer = caller_events[-1]["response"]
            assert_answered(answer)
            (message,) = answer["output"]
            assert message["type"] == "message" and message["role"] == "assistant"
            assert message["content"][0]["text"].strip()
            sideband_answer = sideband_events[-1]["response"]
            assert sideband_answer["id"] == answer["id"]
            assert not any(e["type"] == "response.output_audio.delta" for e in events)

        # The sideband left; the call goes on.
        peer.send({"type": "conversation.item.create", "item": user("Thanks!")})
        added = (await peer.collect("conversation.item.added"))[-1]
        assert added["item"]["content"][0]["text"] == "Thanks!"
    finally:
        await hangup(server, call_id)
        await peer.close()


async def test_sideband_is_closed_when_the_call_hangs_up(server: Server):
    peer, call_id, _ = await open_call(server)
    try:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        async with websockets.connect(sideband_url(server, call_id), additional_headers=headers) as a, \
                websockets.connect(sideband_url(server, call_id), additional_headers=headers) as b:
            # Several sidebands may attach; each gets the events, and an error goes to all.
            await b.send(json.dumps({"type": "conversation.item.delete", "item_id": "nope", "event_id": "e1"}))
            for ws in (a, b):
                error = await next_json(ws)
                assert error["type"] == "error" and error["error"]["event_id"] == "e1"
            assert (await peer.next_event())["type"] == "error"
            assert (await hangup(server, call_id)).status_code == 200
            for ws in (a, b):
                with pytest.raises(websockets.ConnectionClosedOK):
                    await asyncio.wait_for(ws.recv(), 10)
                assert ws.close_code == 1000 and ws.close_reason == "call ended"
        await asyncio.wait_for(peer.closed.wait(), 10)
    finally:
        await peer.close()


async def test_sideband_refusals(server: Server):
    async with http(server) as h:
        secret = (await h.post("/v1/realtime/client_secrets", json={})).json()["value"]
    peer, call_id, _ = await open_call(server)  # placed with the API key
    try:
        url = sideband_url(server, call_id)
        status, error = await denial(url, None)
        assert status == 401 and error["code"] == "missing_api_key"
        status, error = await denial(url, "sk-wrong")
        assert status == 401 and error["code"] == "invalid_api_key"
        status, error = await denial(url, secret)  # an ek owns only the calls placed with it
        assert status == 403 and error["code"] == "call_not_owned" and error["param"] == "call_id"
        status, error = await denial(sideband_url(server, "rtc_000000000000000000000000"), server.api_key)
        assert (status, error["code"], error["param"], error["type"]) == (
            404, "call_not_found", "call_id", "invalid_request_error")
        headers = {"Authorization": f"Bearer {server.api_key}"}
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(MAX_SIDEBANDS_PER_CALL):
                await stack.enter_async_context(websockets.connect(url, additional_headers=headers))
            status, error = await denial(url, server.api_key)
            assert status == 409 and error["code"] == "sideband_limit_reached"
        # The call itself is untouched by all this.
        peer.send({"type": "conversation.item.create", "item": user("still here")})
        assert (await peer.collect("conversation.item.added"))[-1]["item"]["content"][0]["text"] == "still here"
    finally:
        await hangup(server, call_id)
        await peer.close()


async def test_ek_call_takes_sidebands_from_its_ek_and_its_minter(server: Server):
    async with http(server) as h:
        secret = (await h.post("/v1/realtime/client_secrets", json={})).json()["value"]
    peer = Peer()
    async with http(server, secret) as h:
        response = await h.post("/v1/realtime/calls", content=await peer.offer(),
                                headers={"Content-Type": "application/sdp"})
    assert response.status_code == 201, response.text
    call_id = response.headers["location"].rsplit("/", 1)[-1]
    try:
        await peer.connect(response.text)
        assert (await peer.next_event())["type"] == "session.created"
        for key in (secret, server.api_key):
            async with websockets.connect(sideband_url(server, call_id),
                                          additional_headers={"Authorization": f"Bearer {key}"}) as ws:
                await ws.send(json.dumps({"type": "session.update", "session": {"instructions": key[:3]}}))
                assert (await next_json(ws))["session"]["instructions"] == key[:3]
                assert (await peer.next_event())["type"] == "session.updated"
    finally:
        await hangup(server, call_id)
        await peer.close()


@pytest.fixture(scope="module")
def two_key_server() -> Iterator[Server]:
    # One session at most: the call takes it, and a sideband is not a session.
    srv = start_server({"OPENREALTIME_API_KEYS": '["k1", "k2"]', "OPENREALTIME_MAX_SESSIONS": "1"},
                       name="sideband-two-keys")
    srv.api_key = "k1"
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text()


async def test_another_keys_call_is_refused_and_a_sideband_takes_no_session_slot(two_key_server: Server):
    peer, call_id, _ = await open_call(two_key_server)  # placed with k1
    try:
        status, error = await denial(sideband_url(two_key_server, call_id), "k2")
        assert status == 403 and error["code"] == "call_not_owned"
        async with websockets.connect(sideband_url(two_key_server, call_id),
                                      additional_headers={"Authorization": "Bearer k1"}) as ws:
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert (await next_json(ws))["type"] == "input_audio_buffer.cleared"
    finally:
        await hangup(two_key_server, call_id)
        await peer.close()
