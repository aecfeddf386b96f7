"""A spoken turn over WebSocket with the official `openai` SDK and the real speech models."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
import pytest

from tests.audio_fixtures import silence, speak

from .conftest import Server, assert_answered, assert_valid_server_event, client

pytestmark = pytest.mark.e2e
RATE = 24_000
VOICE_SESSION = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "instructions": "You are a helpful assistant. Answer in one short sentence.",
    "audio": {
        "input": {"transcription": {"model": "whisper-1"},
                  "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}},
        "output": {"voice": "alloy"},
    },
}


def rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    return float(np.sqrt((x ** 2).mean())) if len(x) else 0.0


async def send_audio(conn: Any, pcm: bytes, speedup: float = 4.0) -> None:
    """Stream like a microphone (100 ms chunks), faster than real time to keep the test short."""
    step = RATE // 10 * 2
    for i in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())
        await asyncio.sleep(0.1 / speedup)


class Recorder:
    """Reads the connection in the background, validating and keeping every event."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.events: list[dict] = []
        self.audio = bytearray()
        self.first_audio_at = 0.0
        self._new = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.conn:
            data = event.to_dict()
            assert_valid_server_event(data)
            if data["type"] == "response.output_audio.delta":
                self.first_audio_at = self.first_audio_at or time.monotonic()
                self.audio.extend(base64.b64decode(data["delta"]))
            self.events.append(data)
            self._new.set()

    async def wait_for(self, kind: str, after: int = 0, timeout: float = 90) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events[after:]:
                    if e["type"] == kind:
                        return e
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"connection ended before {kind}")
                self._new.clear()
                await self._new.wait()

    def types(self, after: int = 0) -> list[str]:
        return [e["type"] for e in self.events[after:]]


async def test_spoken_question_gets_a_spoken_answer(server: Server):
    question = speak("What is the capital of France?", RATE)
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        rec = Recorder(conn)
        await rec.wait_for("session.created")
        await conn.session.update(session=VOICE_SESSION)  # type: ignore[arg-type]
        await rec.wait_for("session.updated")
        await send_audio(conn, silence(500, RATE) + question + silence(1500, RATE))
        done = await rec.wait_for("response.done")
        rec.task.cancel()
    types = rec.types()
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "response.done"]
    assert [t for t in types if t in order] == order, types
    started = next(e for e in rec.events if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in rec.events if e["type"] == "input_audio_buffer.speech_stopped")
    speech_ms = len(question) // 48
    # Speech began about 500 ms in and ended about 500 ms (the silence wait) after it stopped.
    assert 300 <= started["audio_start_ms"] <= 800
    assert 500 + speech_ms <= stopped["audio_end_ms"] <= 500 + speech_ms + 900
    completed = next(e for e in rec.events
                     if e["type"] == "conversation.item.input_audio_transcription.completed")
    words = completed["transcript"].lower()
    assert "capital" in words and "france" in words, completed
    assert completed["item_id"] == stopped["item_id"]
    transcript = "".join(e["delta"] for e in rec.events if e["type"] == "response.output_audio_transcript.delta")
    final = next(e for e in rec.events if e["type"] == "response.output_audio_transcript.done")["transcript"]
    assert transcript == final and final.strip()
    response = done["response"]
    assert_answered(response)
    assert response["output"][0]["content"][0] == {"type": "output_audio", "transcript": final}
    assert len(rec.audio) // 48 > 300 and rms(bytes(rec.audio)) > 300  # audible speech arrived
    # The reply starts on its first word: Piper's 25-45 ms of silence before it are cut to 5 ms
    # (tts_trim_silence; the resampler's ramp adds a sample or two).
    samples = np.frombuffer(bytes(rec.audio), dtype="<i2").astype(np.int32)
    lead_ms = int(np.flatnonzero(np.abs(samples) > 32)[0]) * 1000 // RATE
    assert lead_ms <= 10, lead_ms


async def test_barge_in_and_client_truncation(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        rec = Recorder(conn)
        await rec.wait_for("session.created")
        # A cap keeps the story (and the answer after it) from running to the end of the context.
        story = {**VOICE_SESSION, "instructions": "Tell a long story about a cat.", "max_output_tokens": 200}
        await conn.session.update(session=story)  # type: ignore[arg-type]
        await rec.wait_for("session.updated")
        await send_audio(conn, silence(300, RATE) + speak("Please tell me a long story.", RATE) + silence(700, RATE))
        await rec.wait_for("response.output_audio.delta")
        # The user talks over the reply while it plays.
        mark = len(rec.events)
        await send_audio(conn, speak("Stop, stop. What time is it?", RATE), speedup=1.0)
        await rec.wait_for("input_audio_buffer.speech_started", after=mark)
        first = next(e for e in rec.events if e["type"] == "response.created")["response"]["id"]
        first_done = await rec.wait_for("response.done")
        assert first_done["response"]["id"] == first
        assert first_done["response"]["status"] in ("cancelled", "completed", "incomplete")
        if first_done["response"]["status"] == "cancelled":
            assert first_done["response"]["status_details"]["reason"] == "turn_detected"
        item_id = first_done["response"]["output"][0]["id"]
        # Like any WebSocket client, report how much of the reply was actually played.
        played_ms = int((time.monotonic() - rec.first_audio_at) * 1000)
        mark = len(rec.events)
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played_ms)
        truncated = await rec.wait_for("conversation.item.truncated", after=mark)
        assert truncated["item_id"] == item_id
        assert 0 < truncated["audio_end_ms"] <= played_ms
        # The interruption became a new turn that is answered normally.
        await send_audio(conn, silence(1000, RATE))
        second = None
        async with asyncio.timeout(90):
            while second is None:
                second = next((e for e in rec.events[mark:] if e["type"] == "response.done"), None)
                await asyncio.sleep(0.05)
        rec.task.cancel()
    # A small model may keep telling the story until the cap: that is still a normal answer.
    status = second["response"]["status"]
    assert status == "completed" or (
        status == "incomplete" and second["response"]["status_details"]["reason"] == "max_output_tokens"), second
    assert second["response"]["output"][0]["content"][0]["transcript"].strip()
    assert "conversation.item.input_audio_transcription.completed" in rec.types(mark)
