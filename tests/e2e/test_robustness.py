"""Regression tests for issue 10's findings 1-4 and 9, through the real server: WebSocket (raw and
the openai SDK) and WebRTC (aiortc). Each ends by checking that the session or call still
completes a normal turn."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import websockets
from openai.types.realtime import SessionUpdatedEvent

from tests.audio_fixtures import silence, speak

from .conftest import Server, assert_valid_server_event
from .webrtc_client import MIC_RATE, MicTrack, Peer, hangup, open_call

pytestmark = pytest.mark.e2e

TEXT = {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                              "audio": {"input": {"turn_detection": None}}}}


def user_text(text: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


class WS:
    """A raw WebSocket client: any bytes out, validated events in."""

    def __init__(self, ws: Any):
        self.ws = ws

    async def send(self, event: dict[str, Any] | str) -> None:
        await self.ws.send(event if isinstance(event, str) else json.dumps(event))

    async def collect(self, until: str, wait_s: float = 60) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(wait_s):
            while True:
                event = json.loads(await self.ws.recv())
                assert_valid_server_event(event)
                out.append(event)
                if event["type"] == until:
                    return out

    async def error_for(self, event_id: str) -> dict[str, Any]:
        events = await self.collect("error")
        error = events[-1]["error"]
        assert error["event_id"] == event_id, events
        assert error["type"] != "server_error" and error["code"] != "server_error", error
        return error

    async def normal_turn(self) -> None:
        await self.send(user_text("Say hi."))
        await self.send({"type": "response.create", "response": {"max_output_tokens": 16}})
        events = await self.collect("response.done")
        assert events[-1]["response"]["status"] in ("completed", "incomplete"), events[-1]
        assert any(e["type"] == "response.output_text.delta" for e in events)


async def connect(server: Server) -> Any:
    return websockets.connect(f"{server.ws_url}/v1/realtime?model=gpt-realtime", max_size=None,
                              additional_headers={"Authorization": f"Bearer {server.api_key}"})


async def test_create_then_cancel_never_wedges_over_websocket(server: Server):
    async with await connect(server) as raw:
        ws = WS(raw)
        await ws.collect("session.created")
        await ws.send(TEXT)
        await ws.collect("session.updated")
        await ws.send(user_text("Tell me a story."))
        for i in range(8):
            await ws.send(json.dumps({"type": "response.create", "event_id": f"c{i}"}) )
            await ws.send({"type": "response.cancel", "event_id": f"x{i}"})
            events = await ws.collect("response.done")
            errors = [e for e in events if e["type"] == "error"]
            assert not errors, errors
            assert [e["type"] for e in events].count("response.created") == 1
            assert events[-1]["response"]["status"] == "cancelled"
        await ws.normal_turn()


async def test_create_then_cancel_never_wedges_over_webrtc(server: Server):
    peer, call_id, _ = await open_call(server)
    try:
        peer.send(TEXT)
        await peer.collect("session.updated")
        for _ in range(8):
            peer.send({"type": "response.create"})
            peer.send({"type": "response.cancel"})
            events = await peer.collect("response.done")
            assert not [e for e in events if e["type"] == "error"], events
            assert events[-1]["response"]["status"] == "cancelled"
        peer.send(user_text("Say hi."))
        peer.send({"type": "response.create", "response": {"max_output_tokens": 16}})
        events = await peer.collect("response.done")
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
    finally:
        await peer.close()
        await hangup(server, call_id)


async def test_speech_resuming_in_the_append_that_ends_the_turn(server: Server):
    """One append holds the end of a turn and the start of the next: the auto response that the
    first turn started is cancelled before it runs, and still ends; the next turn is answered."""
    async with await connect(server) as raw:
        ws = WS(raw)
        await ws.collect("session.created")
        await ws.send({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"], "max_output_tokens": 16,
            "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
        await ws.collect("session.updated")
        pcm = speak("What time is it?") + silence(700) + speak("And what day is it?")
        await ws.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
        await ws.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(silence(1200)).decode()})
        events = await ws.collect("response.done")
        while events[-1]["response"]["status"] == "cancelled":
            events = await ws.collect("response.done")
        assert events[-1]["response"]["status"] in ("completed", "incomplete"), events[-1]
        await ws.normal_turn()


async def test_lone_surrogates_are_refused_and_poison_nothing(server: Server):
    async with await connect(server) as raw:
        ws = WS(raw)
        await ws.collect("session.created")
        await ws.send(TEXT)
        await ws.collect("session.updated")
        await ws.send('{"type": "x\\ud800y", "event_id": "s1"}')
        assert (await ws.error_for("s1"))["param"] == "type"
        await ws.send('{"type": "conversation.item.create", "event_id": "s2", "item": {"type": "message", '
                      '"role": "user", "content": [{"type": "input_text", "text": "hi \\udc00 there"}]}}')
        error = await ws.error_for("s2")
        assert error["param"] == "item.content[0].text" and error["code"] == "invalid_value"
        await ws.normal_turn()
        await ws.normal_turn()


@pytest.mark.parametrize("field", ["prompt", "reasoning", "tracing", "tools"])
@pytest.mark.parametrize("depth", [255, 985, 5000])
async def test_deep_nesting_is_a_client_error(server: Server, field: str, depth: int):
    async with await connect(server) as raw:
        ws = WS(raw)
        await ws.collect("session.created")
        # json.dumps itself recurses; build the text by hand for the deepest documents
        text = json.dumps({"type": "session.update", "event_id": "d1", "session": {field: "@"}})
        text = text.replace('"@"', "{}").replace("{}", _nested(field, depth), 1)
        await ws.send(text)
        error = await ws.error_for("d1")
        assert error["code"] == "nesting_too_deep", error
        await ws.send(TEXT)
        events = await ws.collect("session.updated")
        assert not [e for e in events if e["type"] == "error"]
        await ws.normal_turn()


def _nested(field: str, depth: int) -> str:
    inner = '{"a": ' * depth + '"x"' + "}" * depth
    return {
        "prompt": '{"id": "pmpt_1", "variables": {"v": ' + inner + "}}",
        "reasoning": '{"effort": ' + inner + "}",
        "tracing": '{"metadata": {"m": ' + inner + "}}",
        "tools": '[{"type": "function", "name": "f", "parameters": {"type": "object", "properties": '
                 + inner + "}}]",
    }[field]


async def test_error_params_are_wire_paths_and_prompt_needs_an_id(server: Server):
    async with await connect(server) as raw:
        ws = WS(raw)
        await ws.collect("session.created")
        cases = [
            ({"truncation": {"type": "retention_ratio", "retention_ratio": 5}}, "session.truncation.retention_ratio"),
            ({"audio": {"input": {"turn_detection": {"type": "loud_vad"}}}}, "session.audio.input.turn_detection.type"),
            ({"prompt": {"variables": {"a": "b"}}}, "session.prompt.id"),
        ]
        for i, (session, param) in enumerate(cases):
            await ws.send({"type": "session.update", "event_id": f"p{i}", "session": session})
            error = await ws.error_for(f"p{i}")
            assert error["param"] == param, error
            assert "RetentionRatio" not in error["message"]
        await ws.send({"type": "session.update", "session": {"prompt": {"id": "pmpt_1", "version": "2"}}})
        updated = (await ws.collect("session.updated"))[-1]
        SessionUpdatedEvent.model_validate(updated, strict=True)
        assert updated["session"]["prompt"]["id"] == "pmpt_1"
        await ws.send(TEXT)
        await ws.collect("session.updated")
        await ws.normal_turn()


async def test_webrtc_call_survives_surrogates_and_oversized_events(server: Server):
    """Nothing the server sends may exceed what the peer's data channel accepts (aiortc: 256 KiB)."""
    mic = MicTrack()
    peer, call_id, _ = await open_call(server, peer=Peer(mic=mic))
    try:
        peer.send(TEXT)
        await peer.collect("session.updated")
        # the server echoes the bad type in its error: the send must not fail on the surrogate
        peer.send('{"type": "x\\ud800y", "event_id": "s1"}')
        error = (await peer.collect("error"))[-1]["error"]
        assert error["event_id"] == "s1" and error["param"] == "type"
        # 10 s of caller audio committed by hand: the retrieved item is ~650 KB with its audio
        speech = speak("This is a long sentence that the caller says to fill up ten seconds of audio. " * 2,
                       MIC_RATE)
        mic.say(speech + silence(max(0, 10_000 - len(speech) // 96), MIC_RATE))
        await asyncio.sleep(mic.remaining_ms / 1000 + 0.5)
        peer.send({"type": "input_audio_buffer.commit"})
        committed = (await peer.collect("input_audio_buffer.committed"))[-1]
        peer.send({"type": "conversation.item.retrieve", "item_id": committed["item_id"]})
        retrieved = (await peer.collect("conversation.item.retrieved"))[-1]
        part = retrieved["item"]["content"][0]
        assert part["type"] == "input_audio" and "audio" not in part  # audio left out to fit
        # session.updated grows past the limit: an error names it, the call goes on
        peer.send({"type": "session.update", "session": {"instructions": "Be brief. " * 20_000}})
        await peer.collect("session.updated")
        peer.send({"type": "session.update", "event_id": "big", "session": {"tools": [
            {"type": "function", "name": "f", "description": "d" * 100_000, "parameters": {"type": "object"}}]}})
        error = (await peer.collect("error"))[-1]["error"]
        assert error["code"] == "event_too_large" and "session.updated" in error["message"]
        peer.send({"type": "session.update", "session": {"instructions": "Be brief.", "tools": []}})
        await peer.collect("session.updated")
        peer.send(user_text("Say hi."))
        peer.send({"type": "response.create", "response": {"max_output_tokens": 16}})
        events = await peer.collect("response.done")
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        assert peer.pc.connectionState == "connected"
    finally:
        await peer.close()
        await hangup(server, call_id)
