"""Voice turns in the engine with deterministic stand-ins for VAD/STT/TTS and the player.

The real models are exercised by tests/integration and tests/e2e; here we pin the event logic:
offsets, ordering, interruption, truncation and idle timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import numpy as np

from openrealtime.audio.output import Cleared
from openrealtime.backends.speech import TranscriptDelta, TranscriptDone, Voice
from openrealtime.engine import EngineContext, RealtimeSession
from openrealtime.engine.turns import SilenceBegan, SpeechResumed, SpeechStarted, SpeechStopped, VadTurnDetector

from .test_engine import ScriptedLLM, drain, send, user_text

RATE = 24_000


def tone(ms: int, rate: int = RATE) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def quiet(ms: int, rate: int = RATE) -> bytes:
    return bytes(rate * ms // 1000 * 2)


class EnergyVADStream:
    def __init__(self) -> None:
        self.pending = b""

    async def process(self, pcm16: bytes) -> list[float]:
        self.pending += pcm16
        out = []
        while len(self.pending) >= 1024:
            frame = np.frombuffer(self.pending[:1024], "<i2")
            self.pending = self.pending[1024:]
            out.append(1.0 if np.abs(frame).mean() > 1000 else 0.0)
        return out

    def reset(self) -> None:
        self.pending = b""


class EnergyVAD:
    sample_rate = 16_000
    frame_ms = 32.0

    def new_stream(self) -> EnergyVADStream:
        return EnergyVADStream()


class FixedSTT:
    name = "fixed"
    sample_rate = 16_000

    def __init__(self, text: str = "hello there"):
        self.text = text
        self.calls: list[int] = []

    async def transcribe(self, pcm16: bytes, *, language=None, prompt=None) -> AsyncIterator:
        self.calls.append(len(pcm16))
        await asyncio.sleep(0.01)
        yield TranscriptDelta(self.text)
        yield TranscriptDone(self.text, "en", len(pcm16) / 32000)


class ToneTTS:
    """100 ms of tone per word, at 16 kHz, yielded word by word."""

    name = "tone"
    sample_rate = 16_000

    def voices(self) -> list[Voice]:
        return [Voice("joe", "Joe", "en-US", aliases=("alloy",))]

    def resolve_voice(self, name: str) -> Voice | None:
        v = self.voices()[0]
        return v if name.lower() in (v.id, *v.aliases) else None

    async def synthesize(self, text: str, *, voice: str, speed: float = 1.0) -> AsyncIterator[bytes]:
        for _ in text.split():
            await asyncio.sleep(0)
            yield tone(100, 16_000)


class FakePlayer:
    """Plays instantly on demand: `advance(ms)` moves the playhead."""

    def __init__(self) -> None:
        self.listener = None
        self.queue: list[tuple[str, str, int]] = []  # (response, item, ms)
        self.played: dict[str, int] = {}
        self.finished: set[str] = set()
        self.started: set[str] = set()

    def play(self, response_id: str, item_id: str, pcm16: bytes) -> None:
        self.queue.append((response_id, item_id, len(pcm16) // 48))

    def finish(self, response_id: str) -> None:
        self.finished.add(response_id)

    def advance(self, ms: int) -> None:
        while ms > 0 and self.queue:
            rid, iid, left = self.queue[0]
            if rid not in self.started:
                self.started.add(rid)
                self.listener.playback_started(rid)
            step = min(ms, left)
            self.played[iid] = self.played.get(iid, 0) + step
            ms -= step
            if step == left:
                self.queue.pop(0)
                if rid in self.finished and not any(q[0] == rid for q in self.queue):
                    self.listener.playback_stopped(rid)
            else:
                self.queue[0] = (rid, iid, left - step)

    def clear(self) -> Cleared | None:
        if not self.queue:
            return None
        rid, iid, _ = self.queue[0]
        self.queue.clear()
        return Cleared(rid, iid, self.played.get(iid, 0))

    def played_ms(self, item_id: str) -> int:
        return self.played.get(item_id, 0)

    @property
    def busy(self) -> bool:
        return bool(self.queue)


def voice_session(llm: ScriptedLLM, stt: FixedSTT | None = None, player: FakePlayer | None = None) -> RealtimeSession:
    async def resolve(model: str | None) -> ScriptedLLM:
        return llm

    ctx = EngineContext(resolve_llm=resolve, default_model="m", default_instructions="Be brief.",
                        vad=EnergyVAD(), stt=stt or FixedSTT(), tts=ToneTTS())
    s = RealtimeSession(ctx, transport="webrtc" if player else "websocket")
    s.audio_output = player
    return s


async def append(s: RealtimeSession, pcm: bytes, chunk_ms: int = 100) -> None:
    step = RATE * chunk_ms // 1000 * 2
    for i in range(0, len(pcm), step):
        await send(s, {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step]).decode()})


def test_detector_offsets_and_speculation():
    d = VadTurnDetector(0.5, silence_duration_ms=320, frame_ms=32)
    probs = [0.0] * 5 + [0.9] * 10 + [0.0] * 6 + [0.9] * 3 + [0.0] * 12
    events = []
    for i, p in enumerate(probs):
        events += [(i, e) for e in d.feed(p, i * 32)]
    kinds = [type(e) for _, e in events]
    assert kinds == [SpeechStarted, SilenceBegan, SpeechResumed, SilenceBegan, SpeechStopped]
    assert events[0][1].start_ms == 5 * 32
    stop = events[-1][1]
    assert stop.speech_end_ms == 24 * 32 and stop.end_ms == 24 * 32 + 320


def test_speculation_starts_after_the_configured_quiet():
    """stt_speculate_ms: SilenceBegan after that much quiet, never later than half the silence wait."""
    def began_after(detector: VadTurnDetector) -> int:
        frames = [0.9] * 10 + [0.0] * 40
        for i, p in enumerate(frames):
            if any(isinstance(e, SilenceBegan) for e in detector.feed(p, i * 32)):
                return (i + 1 - 10) * 32  # quiet ms at the end of that frame
        raise AssertionError("no SilenceBegan")

    assert began_after(VadTurnDetector(0.5, 1200, 32)) == 128  # the default 100 ms, in 32 ms frames
    assert began_after(VadTurnDetector(0.5, 1200, 32, speculate_ms=200)) == 224
    assert began_after(VadTurnDetector(0.5, 300, 32, speculate_ms=400)) == 160  # half of 300
    off = VadTurnDetector(0.5, 300, 32, speculate_ms=0)  # 0: never; the turn still ends on time
    events = [e for i, p in enumerate([0.9] * 10 + [0.0] * 20) for e in off.feed(p, i * 32)]
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]


async def test_server_vad_turn_over_websocket():
    llm = ScriptedLLM(["Hi ", "there, ", "friend. ", "How ", "are ", "you?"])
    s = voice_session(llm)
    await s.start()
    [created] = await drain(s)
    assert created["session"]["output_modalities"] == ["audio"]
    assert created["session"]["audio"]["output"]["voice"] == "joe"
    await send(s, {"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    await drain(s)
    await append(s, quiet(500) + tone(800) + quiet(600))
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert types[:5] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    started, stopped = events[0], events[1]
    assert abs(started["audio_start_ms"] - 500) <= 64
    assert abs(stopped["audio_end_ms"] - (1300 + 300)) <= 64
    assert started["item_id"] == stopped["item_id"] == events[2]["item_id"]
    completed = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == "hello there"
    assert types.index("conversation.item.input_audio_transcription.completed") < types.index(
        "response.output_item.added")
    # The LLM saw the transcript as the user's turn.
    assert llm.prompts[0][-1].content == "hello there"
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    assert transcript == "Hi there, friend. How are you?"
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert abs(len(audio) // 48 - 600) <= 20  # six words, 100 ms each, at 24 kHz
    tail = types[types.index("response.output_audio.done"):]
    assert tail == ["response.output_audio.done", "response.output_audio_transcript.done",
                    "response.content_part.done", "response.output_item.done", "conversation.item.done",
                    "response.done"]
    done = events[-1]["response"]
    assert done["output"][0]["content"][0] == {"type": "output_audio", "transcript": transcript}
    await s.close()


async def test_barge_in_over_webrtc_truncates_to_what_was_heard():
    llm = ScriptedLLM(["One two three four. ", "Five six seven eight. ", "Nine ten."])
    player = FakePlayer()
    s = voice_session(llm, player=player)
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    await drain(s)
    await append(s, tone(600) + quiet(500))
    events = await drain(s, "response.done")
    assert not [e for e in events if e["type"] == "response.output_audio.delta"]  # WebRTC: audio on the track
    player.advance(550)  # the caller has heard 550 ms: "One two three four. Five"
    events = await drain(s)
    assert [e["type"] for e in events] == ["output_audio_buffer.started"]
    item_id = player.queue[0][1]
    await append(s, tone(300))
    events = await drain(s)
    types = [e["type"] for e in events]
    assert types == ["input_audio_buffer.speech_started", "output_audio_buffer.cleared",
                     "conversation.item.truncated"]
    assert events[2]["item_id"] == item_id and events[2]["audio_end_ms"] == 550
    item = s.conversation.get(item_id)
    assert item.content[0].transcript == "One two three four. Five"
    assert s.spoken[item_id].ms == 550
    # A new turn after the interruption works normally, and sees the cut transcript.
    await append(s, quiet(500))
    await drain(s, "response.done")
    assert ("assistant", "One two three four. Five") in [(m.role, m.content) for m in llm.prompts[-1]]
    await s.close()


async def test_interrupt_cancels_a_response_still_generating():
    llm = ScriptedLLM(["word "] * 200, delay=0.01)
    player = FakePlayer()
    s = voice_session(llm, player=player)
    await s.start()
    await send(s, {"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    await append(s, tone(600) + quiet(500))
    await drain(s, "response.output_audio_transcript.delta")
    player.advance(120)
    await append(s, tone(300))
    events = await drain(s, "conversation.item.truncated")
    types = [e["type"] for e in events]
    assert types[0] == "output_audio_buffer.started" and "input_audio_buffer.speech_started" in types
    done = next(e for e in events if e["type"] == "response.done")["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    assert types.index("output_audio_buffer.cleared") < types.index("conversation.item.truncated")
    assert events[-1]["audio_end_ms"] == 120
    await s.close()


async def test_client_truncate_clamps_and_cuts_transcript():
    s = voice_session(ScriptedLLM(["Alpha beta. ", "Gamma delta."]))
    await s.start()
    await send(s, user_text("hi"))
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    item_id = events[-1]["response"]["output"][0]["id"]
    await send(s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                   "audio_end_ms": 99_999})
    [truncated] = await drain(s)
    assert truncated["audio_end_ms"] == 400  # clamped to the audio's length
    await send(s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                   "audio_end_ms": 200})
    await drain(s)
    assert s.conversation.get(item_id).content[0].transcript == "Alpha beta."
    await send(s, {"type": "conversation.item.retrieve", "item_id": item_id})
    [retrieved] = await drain(s)
    assert len(base64.b64decode(retrieved["item"]["content"][0]["audio"])) == 200 * 48
    await s.close()


async def test_manual_commit_and_g711_formats():
    stt = FixedSTT("manual words")
    s = voice_session(ScriptedLLM(["Ok."]), stt=stt)
    await s.start()
    await send(s, {"type": "session.update", "session": {"audio": {
        "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
        "output": {"format": {"type": "audio/pcma"}}}}})
    await drain(s)
    from openrealtime.audio.codecs import pcm16_to_ulaw
    from openrealtime.audio.resample import resample
    await send(s, {"type": "input_audio_buffer.append",
                   "audio": base64.b64encode(pcm16_to_ulaw(resample(tone(400), RATE, 8000))).decode()})
    events = await drain(s)
    assert not [e for e in events if "speech" in e["type"]]  # no turn detection
    await send(s, {"type": "input_audio_buffer.commit"})
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    assert stt.calls == [400 * 32]  # 400 ms at 16 kHz, resampled from 8 kHz μ-law
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert abs(len(audio) - 800) <= 10  # 100 ms of A-law at 8 kHz: one byte per sample
    await s.close()


async def test_unknown_voice_is_rejected_with_strict_names():
    s = voice_session(ScriptedLLM([]))
    s.ctx.strict_names = True
    await s.start()
    await drain(s)
    await s.handle_text(json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "zeus"}}}}))
    [err] = await drain(s)
    assert err["error"]["param"] == "session.audio.output.voice"
    await send(s, {"type": "session.update", "session": {"audio": {"output": {"voice": "ALLOY"}}}})
    [ok] = await drain(s)
    assert ok["type"] == "session.updated"
    assert ok["session"]["audio"]["output"]["voice"] == "joe"  # the voice that really speaks


async def test_hosted_service_names_map_to_ours():
    """Inworld's voices and transcription models apply as what we have; the rest of the update applies."""
    s = voice_session(ScriptedLLM([]))
    s.ctx.voice_aliases = {"clive": "alloy"}
    await s.start()
    await drain(s)
    for voice in ("Dennis", "Clive"):
        await send(s, {"type": "session.update", "session": {
            "instructions": f"Speak as {voice}.",
            "audio": {"input": {"transcription": {"model": "assemblyai/universal-streaming-multilingual"}},
                      "output": {"voice": voice}}}})
        [ok] = await drain(s)
        assert ok["type"] == "session.updated", ok
        assert ok["session"]["instructions"] == f"Speak as {voice}."
        assert ok["session"]["audio"]["output"]["voice"] == "joe"
        assert ok["session"]["audio"]["input"]["transcription"]["model"] == "fixed"
    await s.close()


async def test_idle_timeout_triggers_a_response_after_playback():
    player = FakePlayer()
    s = voice_session(ScriptedLLM(["Still there?"]), player=player)
    await s.start()
    await send(s, {"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300, "idle_timeout_ms": 5000}}}}})
    await drain(s)
    # Below the API minimum of 5 s, to keep the test short.
    object.__setattr__(s.config.audio.input.turn_detection, "idle_timeout_ms", 200)
    await send(s, user_text("hi"))
    await send(s, {"type": "response.create"})
    await drain(s, "response.done")
    player.advance(10_000)
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert types[:3] == ["output_audio_buffer.started", "output_audio_buffer.stopped",
                         "input_audio_buffer.timeout_triggered"]
    assert "response.created" in types
    await s.close()
