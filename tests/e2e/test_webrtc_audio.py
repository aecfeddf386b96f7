"""A spoken conversation over WebRTC against the real server: the client's microphone carries
synthesized speech, the server detects the turn, transcribes, answers, and speaks back on the
media track; then the caller interrupts the spoken reply (barge-in).

Model quality does not matter here (the test model is tiny); the pipeline and its events do.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from ..audio_fixtures import silence, speak, speech_available, write_wav
from .conftest import ARTIFACTS, Server
from .webrtc_client import MIC_RATE, MicTrack, Peer, hangup, open_call

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not speech_available(), reason="no speech synthesizer for test audio"),
]

QUESTION = "What is the capital of France?"
VOICE_SESSION: dict[str, Any] = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "audio": {"input": {"turn_detection": {"type": "server_vad"},
                        "transcription": {"model": "whisper-1"}}},
}
SPEECH_RMS = 300.0  # decoded Opus of digital silence stays far below this
SILENCE_RMS = 60.0


async def voice_call(server: Server, session: dict[str, Any]) -> tuple[Peer, MicTrack, str]:
    mic = MicTrack()
    peer, call_id, _ = await open_call(server, "sdp", peer=Peer(mic=mic, record=True))
    try:
        peer.send({"type": "session.update", "session": session})
        updated = (await peer.collect("session.updated"))[-1]["session"]
        assert updated["output_modalities"] == ["audio"]
        assert updated["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    except BaseException:
        await hangup(server, call_id)
        await peer.close()
        raise
    return peer, mic, call_id


def index(types: list[str], name: str) -> int:
    assert name in types, (name, types)
    return types.index(name)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


async def test_spoken_question_gets_a_spoken_answer(server: Server):
    peer, mic, call_id = await voice_call(server, {**VOICE_SESSION, "max_output_tokens": 60,
                                                   "instructions": "Answer in one short sentence."})
    try:
        mic.say(silence(500, MIC_RATE) + speak(QUESTION, MIC_RATE) + silence(1500, MIC_RATE))
        events = await peer.collect("output_audio_buffer.stopped", wait_s=120)
        stopped_at = peer.last_event_at
        types = [e["type"] for e in events]
        assert "error" not in types, [e for e in events if e["type"] == "error"]

        started = index(types, "input_audio_buffer.speech_started")
        assert started < index(types, "input_audio_buffer.speech_stopped") \
            < index(types, "input_audio_buffer.committed") < index(types, "response.created")
        committed = events[index(types, "input_audio_buffer.committed")]
        assert events[started]["audio_start_ms"] >= 300  # after the leading half second of silence

        transcripts = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
        if not transcripts:  # transcription may finish after the reply
            transcripts = [e for e in await peer.collect(
                "conversation.item.input_audio_transcription.completed", wait_s=30)
                if e["type"] == "conversation.item.input_audio_transcription.completed"]
        [transcript] = transcripts
        assert transcript["item_id"] == committed["item_id"]
        assert {"capital", "france"} <= words(transcript["transcript"]), transcript

        response_id = events[index(types, "response.created")]["response"]["id"]
        audio_started = events[index(types, "output_audio_buffer.started")]
        assert audio_started["response_id"] == response_id
        assert index(types, "response.created") < index(types, "output_audio_buffer.started")
        deltas = [e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"]
        assert "".join(deltas).strip()
        assert "response.output_audio.delta" not in types  # WebRTC audio goes over the track
        [done] = [e for e in events if e["type"] == "response.done"]
        assert done["response"]["id"] == response_id
        # A normal answer: complete, or capped by the session's max_output_tokens (SmolLM2 rambles).
        assert done["response"]["status"] == "completed" or done["response"]["status_details"] == {
            "type": "incomplete", "reason": "max_output_tokens"}, done
        assert events[-1]["response_id"] == response_id

        # The client heard the reply: loud frames while it played, silence before the question.
        started_at = next(h.at for h in peer.heard if h.rms > SPEECH_RMS)
        reply = peer.heard_between(started_at, stopped_at + 0.3)
        assert sum(h.ms for h in reply if h.rms > SPEECH_RMS) >= 300, [round(h.rms) for h in reply]
        write_wav(ARTIFACTS / "webrtc-reply.wav", b"".join(h.pcm for h in reply), reply[0].rate)  # to listen to
        assert all(h.rms < SILENCE_RMS for h in peer.heard[5:20])  # nothing played before the question
    finally:
        await hangup(server, call_id)
        await peer.close()


async def test_barge_in_cuts_the_spoken_reply(server: Server):
    session = {**VOICE_SESSION, "max_output_tokens": 400,
               "instructions": "Tell long, detailed stories of at least ten sentences."}
    peer, mic, call_id = await voice_call(server, session)
    try:
        mic.say(silence(500, MIC_RATE) + speak("Tell me a long story about a dragon.", MIC_RATE)
                + silence(800, MIC_RATE))
        before = await peer.collect("output_audio_buffer.started", wait_s=120)
        response_id = before[-1]["response_id"]
        assert [e for e in before if e["type"] == "response.created"][-1]["response"]["id"] == response_id
        audio_started_at = peer.last_event_at
        await asyncio.sleep(1.5)  # let the reply play a while, then talk over it
        mic.say(speak("Stop. Wait a moment please.", MIC_RATE) + silence(1000, MIC_RATE))

        events: list[dict[str, Any]] = []
        cleared_at = 0.0
        async with asyncio.timeout(60):
            while not ({"conversation.item.truncated", "output_audio_buffer.cleared"} <= {e["type"] for e in events}
                       and any(e["type"] == "response.done" and e["response"]["id"] == response_id
                               for e in events)):
                events.append(await peer.next_event())
                if events[-1]["type"] == "output_audio_buffer.cleared":
                    cleared_at = peer.last_event_at
        types = [e["type"] for e in events]
        assert "error" not in types, [e for e in events if e["type"] == "error"]
        assert index(types, "input_audio_buffer.speech_started") < index(types, "output_audio_buffer.cleared")
        assert ("output_audio_buffer.stopped", response_id) not in [
            (e["type"], e.get("response_id")) for e in events]

        cleared = events[index(types, "output_audio_buffer.cleared")]
        assert cleared["response_id"] == response_id
        [done] = [e for e in events if e["type"] == "response.done" and e["response"]["id"] == response_id]
        assert done["response"]["status"] in ("cancelled", "completed", "incomplete"), done
        if done["response"]["status"] == "cancelled":
            assert done["response"]["status_details"]["reason"] == "turn_detected"
        [item] = [o for o in done["response"]["output"] if o["type"] == "message"]

        truncated = events[index(types, "conversation.item.truncated")]
        assert truncated["item_id"] == item["id"] and truncated["content_index"] == 0
        # The server counts the samples it sent; the client has heard a little less by the time the
        # cleared event arrives (frames in flight, aiortc's ~80 ms jitter buffer). Counting from just
        # before `output_audio_buffer.started` arrived overestimates what was heard, never less.
        heard = peer.heard_between(audio_started_at - 0.1, cleared_at)
        assert any(h.rms > SPEECH_RMS for h in heard), [round(h.rms) for h in heard]
        heard_ms = sum(h.ms for h in heard)
        assert 200 <= truncated["audio_end_ms"] <= heard_ms + 250, (truncated, heard_ms)

        # The server stopped speaking at once: silence shortly after the clear.
        await asyncio.sleep(0.6)
        after = peer.heard_between(cleared_at + 0.25, cleared_at + 0.5)
        assert after and all(h.rms < SILENCE_RMS for h in after), [round(h.rms) for h in after]
    finally:
        await hangup(server, call_id)
        await peer.close()
