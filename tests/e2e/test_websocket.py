"""The official `openai` SDK against the real server process over WebSocket."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets

from .conftest import Server, client, collect

pytestmark = pytest.mark.e2e


async def test_text_turn_with_the_openai_sdk(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        created = await collect(conn, "session.created")
        assert created[0]["type"] == "session.created"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "instructions": "You are terse. Reply in a few words."})
        updated = await collect(conn, "session.updated")
        assert updated[-1]["session"]["instructions"].startswith("You are terse")
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]})
        await conn.response.create(response={"max_output_tokens": 40})
        events = await collect(conn, "response.done")
    types = [e["type"] for e in events]
    assert types[:2] == ["conversation.item.added", "conversation.item.done"]
    i = types.index("response.created")
    assert types[i + 1:i + 4] == ["response.output_item.added", "conversation.item.added",
                                  "response.content_part.added"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas, "the model streamed no text"
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == "".join(deltas) and done["text"].strip()
    response = events[-1]["response"]
    assert response["status"] in ("completed", "incomplete")
    assert response["usage"]["output_tokens"] == len(deltas) or response["usage"]["output_tokens"] >= 1
    assert response["usage"]["input_tokens"] > 0
    assert response["output"][0]["content"][0]["text"] == done["text"]


async def test_max_output_tokens_and_kv_cache_across_turns(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Write a long story about a dragon."}]})
        await conn.response.create(response={"max_output_tokens": 3})
        first = (await collect(conn, "response.done"))[-1]["response"]
        assert first["status"] == "incomplete"
        assert first["status_details"]["reason"] == "max_output_tokens"
        assert first["usage"]["output_tokens"] == 3
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Shorter."}]})
        await conn.response.create(response={"max_output_tokens": 3})
        second = (await collect(conn, "response.done"))[-1]["response"]
        # The unchanged prompt prefix (system + first turn) came from the KV cache.
        assert second["usage"]["input_token_details"]["cached_tokens"] > 0


async def test_cancel_then_continue(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Count from one to one hundred in words."}]})
        await conn.response.create()
        await collect(conn, "response.output_text.delta")
        await conn.response.cancel()
        done = (await collect(conn, "response.done"))[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"]["reason"] == "client_cancelled"
        await conn.response.create(response={"max_output_tokens": 8})
        assert (await collect(conn, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")


async def test_bad_events_get_errors_and_the_session_goes_on(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.send_raw("{this is not json")  # type: ignore[attr-defined]
        err = (await collect(conn, "error"))[-1]["error"]
        assert err["code"] == "invalid_json"
        await conn.send_raw(json.dumps({"type": "no.such.event", "event_id": "e1"}))  # type: ignore[attr-defined]
        err = (await collect(conn, "error"))[-1]["error"]
        assert (err["param"], err["event_id"]) == ("type", "e1")
        await conn.send_raw(json.dumps({"type": "session.update", "event_id": "e2",  # type: ignore[attr-defined]
                                        "session": {"type": "realtime", "audio": {"output": {"speed": 2.0}}}}))
        err = (await collect(conn, "error"))[-1]["error"]
        assert (err["param"], err["event_id"]) == ("session.audio.output.speed", "e2")
        await conn.send_raw(json.dumps({"type": "session.update", "event_id": "e3",  # type: ignore[attr-defined]
                                        "session": {"type": "realtime", "max_output_tokens": 0}}))
        err = (await collect(conn, "error"))[-1]["error"]
        assert (err["param"], err["event_id"]) == ("session.max_output_tokens", "e3")
        await conn.send_raw(json.dumps({"type": "session.update", "event_id": "e4",  # type: ignore[attr-defined]
                                        "session": {"type": "realtime", "temperature": "warm"}}))
        err = (await collect(conn, "error"))[-1]["error"]
        assert (err["param"], err["event_id"]) == ("session.temperature", "e4")
        # The session still works after all of that.
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]})
        await conn.response.create(response={"max_output_tokens": 5})
        assert (await collect(conn, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")


async def test_auth_rejections(server: Server):
    url = f"{server.ws_url}/v1/realtime?model=gpt-realtime"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(websockets.InvalidStatus) as exc:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert exc.value.response.status_code == 401
        body = json.loads(exc.value.response.body)
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] in ("missing_api_key", "invalid_api_key")
    # The browser form: the key as a subprotocol, next to "realtime".
    async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{server.api_key}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
    # Basic auth with the raw key (Inworld clients).
    async with websockets.connect(url, additional_headers={"Authorization": f"Basic {server.api_key}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{server.base_url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = await http.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {server.api_key}"})
        assert r.status_code == 200 and any(m["id"] == "smollm2-135m" for m in r.json()["data"])


async def test_out_of_band_response(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.response.create(response={
            "conversation": "none", "metadata": {"purpose": "classify"}, "max_output_tokens": 5,
            "input": [{"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "Is the sky blue? Answer yes or no."}]}]})
        events = await collect(conn, "response.done")
        assert not [e for e in events if e["type"].startswith("conversation.item")]
        response = events[-1]["response"]
        assert response["conversation_id"] is None and response["metadata"] == {"purpose": "classify"}
