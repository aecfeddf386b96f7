"""A transcription session over WebSocket with the official `openai` SDK and the real models:
deltas while the user is still speaking, a consistent final transcript, logprobs, no responses."""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Any

import pytest

from tests.audio_fixtures import silence, speak, speech_available

from .conftest import Server, client
from .test_voice_websocket import RATE, Recorder

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not speech_available(), reason="no speech synthesizer (piper or espeak-ng)")]

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet forest."
SECOND = "Please write down my phone number and call me back tomorrow morning."
SESSION = {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": RATE},
    "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
    "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
    "noise_reduction": None}}}
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def overlap(heard: str, said: str) -> float:
    """Share of the spoken words found in the transcript."""
    got = set(words(heard))
    return sum(w in got for w in words(said)) / len(words(said))


async def stream_in_real_time(conn: Any, pcm: bytes) -> None:
    """100 ms chunks at the pace of a microphone: partial decodes see the utterance grow."""
    step = RATE // 10 * 2
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n, i in enumerate(range(0, len(pcm), step)):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())
        await asyncio.sleep(max(0.0, start + (n + 1) * 0.1 - loop.time()))


async def test_transcription_session_streams_deltas_while_speaking(server: Server):
    speech = speak(SENTENCE, RATE)
    assert len(speech) // 48 >= 3500  # long enough for several partial decodes
    async with client(server).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        rec = Recorder(conn)  # validates every event strictly against the SDK types (and zod)
        created = await rec.wait_for("session.created")
        assert created["session"]["type"] == "transcription"
        assert created["session"]["object"] == "realtime.transcription_session"
        await conn.session.update(session=SESSION)  # type: ignore[arg-type]
        updated = await rec.wait_for("session.updated")
        assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"

        await stream_in_real_time(conn, silence(500, RATE) + speech + silence(1200, RATE))
        completed = await rec.wait_for(COMPLETED, timeout=30)
        first = list(rec.events)

        # Second utterance with logprobs.
        mark = len(rec.events)
        await conn.session.update(session={"type": "transcription",
                                           "include": ["item.input_audio_transcription.logprobs"]})
        await rec.wait_for("session.updated", after=mark)
        await stream_in_real_time(conn, speak(SECOND, RATE) + silence(1200, RATE))
        completed2 = await rec.wait_for(COMPLETED, after=mark, timeout=30)
        second = rec.events[mark:]

        # A transcription session never answers.
        mark = len(rec.events)
        await conn.response.create()
        error = await rec.wait_for("error", after=mark)
        rec.task.cancel()

    types = [e["type"] for e in first]
    stopped = types.index("input_audio_buffer.speech_stopped")
    item_id = first[stopped]["item_id"]
    deltas = [e for e in first if e["type"] == DELTA]
    early = [e for e in first[:stopped] if e["type"] == DELTA]
    assert early, f"no delta before speech_stopped: {types}"
    assert {e["item_id"] for e in deltas} == {item_id} == {completed["item_id"]}
    assert "".join(e["delta"] for e in deltas) == completed["transcript"]
    assert overlap(completed["transcript"], SENTENCE) >= 0.7, completed["transcript"]
    assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 4
    assert "logprobs" not in completed
    # The audio still becomes a conversation item, committed once the turn ended.
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done", COMPLETED]
    assert [t for t in types if t in order] == order, types

    deltas2 = [e for e in second if e["type"] == DELTA]
    assert "".join(e["delta"] for e in deltas2) == completed2["transcript"]
    assert overlap(completed2["transcript"], SECOND) >= 0.7, completed2["transcript"]
    assert completed2["logprobs"] and "".join(lp["token"] for lp in completed2["logprobs"]) == completed2["transcript"]
    for event in deltas2:
        assert "".join(lp["token"] for lp in event["logprobs"]) == event["delta"]
        assert all(lp["logprob"] <= 0 for lp in event["logprobs"])

    assert not [t for t in rec.types() if t.startswith("response.")]
    assert error["error"]["code"] == "unsupported_event" and error["error"]["param"] == "type"
