"""Clients nobody on the team wrote: Inworld's dialect (the spec's own vendor), names from hosted
services, and browser apps on other origins (CORS) — all against the real server.

The spec's examples are read from the spec document itself (``shared/spec``) and sent verbatim.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from .conftest import Server, assert_valid_server_event
from .webrtc_client import Peer, answer_of

pytestmark = pytest.mark.e2e

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "realtime-webrtc-api.txt"


def spec_examples() -> list[dict[str, Any]]:
    """Every top-level JSON object of the spec document, in order."""
    if not SPEC.exists():
        if os.environ.get("CI"):
            raise AssertionError(f"the spec document is missing: {SPEC}")
        pytest.skip(f"the spec document is not beside the project ({SPEC})")
    text = SPEC.read_text()
    decoder = json.JSONDecoder()
    out = []
    for match in re.finditer(r"^\{", text, re.M):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def spec_example(predicate: Any) -> dict[str, Any]:
    found = [e for e in spec_examples() if predicate(e)]
    assert found, "example not found in the spec"
    return found[0]


async def ws_events(ws: Any, until: str, wait_s: float = 90) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(wait_s):
        while True:
            event = json.loads(await ws.recv())
            assert_valid_server_event(event)
            out.append(event)
            if event["type"] == until:
                return out


@pytest.mark.parametrize("auth", ["basic-raw", "basic-rfc7617", "bearer"])
async def test_inworld_websocket_path_runs_the_spec_session_update_verbatim(server: Server, auth: str):
    update = spec_example(lambda e: e.get("type") == "session.update")
    item = spec_example(lambda e: e.get("type") == "conversation.item.create")
    header = {
        "basic-raw": f"Basic {server.api_key}",
        "basic-rfc7617": "Basic " + base64.b64encode(f"user:{server.api_key}".encode()).decode(),
        "bearer": f"Bearer {server.api_key}",
    }[auth]
    url = f"{server.ws_url}/api/v1/realtime/session?key=voice-{auth}&protocol=realtime"
    async with websockets.connect(url, additional_headers={"Authorization": header}, max_size=None) as ws:
        created = await ws_events(ws, "session.created")
        assert created[-1]["type"] == "session.created"
        await ws.send(json.dumps(update))
        events = await ws_events(ws, "session.updated")
        assert not [e for e in events if e["type"] == "error"], events
        session = events[-1]["session"]
        assert session["instructions"] == update["session"]["instructions"]
        td = session["audio"]["input"]["turn_detection"]
        assert td["type"] == "semantic_vad" and td["eagerness"] == "medium"
        assert session["audio"]["output"]["voice"] == "joe"  # "Dennis" is spoken by our voice
        assert session["audio"]["input"]["transcription"]["model"] == "whisper-tiny.en"
        await ws.send(json.dumps(item))
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 40}}))
        events = await ws_events(ws, "response.done")
        response = events[-1]["response"]
        assert response["status"] in ("completed", "incomplete"), response
        assert response["output"] and response["output"][0]["content"][0]["transcript"]
        assert any(e["type"] == "response.output_audio.delta" for e in events)
    # the substitution is logged, once per session
    per_session = Counter(re.findall(r"session (\S+): voice 'Dennis' is not available here", server.log_text()))
    assert per_session and set(per_session.values()) == {1}, per_session


async def test_inworld_path_needs_a_key_and_the_realtime_protocol(server: Server):
    url = f"{server.ws_url}/api/v1/realtime/session?key=s1&protocol=realtime"
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with websockets.connect(url, additional_headers={"Authorization": "Basic wrong-key"}):
            pass
    assert exc.value.response.status_code == 401
    assert json.loads(exc.value.response.body)["error"]["code"] == "invalid_api_key"
    url = f"{server.ws_url}/api/v1/realtime/session?key=s1&protocol=sip"
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with websockets.connect(url, additional_headers={"Authorization": f"Basic {server.api_key}"}):
            pass
    assert exc.value.response.status_code == 400
    assert json.loads(exc.value.response.body)["error"]["param"] == "protocol"


async def test_hosted_names_fall_back_and_session_updated_shows_what_serves(server: Server):
    """Inworld pages name voice Clive and model openai/gpt-4o-mini: the update applies whole."""
    url = f"{server.ws_url}/v1/realtime?model=openai/gpt-4o-mini"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {server.api_key}"}) as ws:
        created = (await ws_events(ws, "session.created"))[-1]["session"]
        assert created["model"] == "smollm2-135m"
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "model": "groq/llama-3.3-70b-versatile", "instructions": "Be Clive.",
            "output_modalities": ["text"], "audio": {"output": {"voice": "Clive"}}}}))
        events = await ws_events(ws, "session.updated")
        assert not [e for e in events if e["type"] == "error"], events
        session = events[-1]["session"]
        assert session["instructions"] == "Be Clive." and session["model"] == "smollm2-135m"
        assert session["audio"]["output"]["voice"] == "joe"
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 20}}))
        response = (await ws_events(ws, "response.done"))[-1]["response"]
        assert response["status"] in ("completed", "incomplete"), response
    log = server.log_text()
    assert "voice 'Clive' is not available here; using 'joe'" in log
    assert "model 'groq/llama-3.3-70b-versatile' is not available here; using 'smollm2-135m'" in log


async def test_create_call_with_the_spec_example_body_completes_a_turn(server: Server):
    body = spec_example(lambda e: "sdp" in e and "session" in e)
    peer = Peer(record=True)
    try:
        offer = await peer.offer()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30,
                                     headers={"Authorization": f"Bearer {server.api_key}"}) as http:
            response = await http.post("/v1/realtime/calls", json={**body, "sdp": offer})
        _, answer = answer_of("json", response)
        await peer.connect(answer)
        created = await peer.next_event()
        assert created["type"] == "session.created"
        session = created["session"]
        assert session["instructions"] == body["session"]["instructions"]
        assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
        assert session["audio"]["output"]["voice"] == "joe" and session["model"] == "smollm2-135m"
        peer.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}})
        peer.send({"type": "response.create", "response": {"max_output_tokens": 30}})
        events = await peer.collect("response.done")
        assert events[-1]["response"]["status"] in ("completed", "incomplete"), events[-1]
        assert any(e["type"] == "output_audio_buffer.started" for e in events) or \
            (await peer.collect("output_audio_buffer.started"))
    finally:
        await peer.close()


@pytest.mark.parametrize("path", ["/v1/realtime/calls", "/v1/realtime/client_secrets", "/v1/models"])
async def test_cors_preflight_accepts_the_headers_sdks_send(server: Server, path: str):
    asked = "authorization, content-type, x-openai-agents-sdk, openai-beta, x-stainless-os, openai-organization"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        r = await http.options(path, headers={"Origin": "http://app.example:5173",
                                              "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": asked})
        assert r.status_code == 200, r.text
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {h.strip() for h in asked.split(",")} <= allowed
        assert r.headers["access-control-allow-origin"] in ("*", "http://app.example:5173")
        r = await http.get("/v1/models", headers={"Origin": "http://app.example:5173",
                                                  "Authorization": f"Bearer {server.api_key}"})
        assert "location" in r.headers.get("access-control-expose-headers", "").lower()
