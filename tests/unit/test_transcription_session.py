"""Transcription sessions in the engine, with stand-in VAD and STT: config shape, no responses,
deltas while the user speaks, logprobs."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest
from openai.types.realtime import SessionCreatedEvent, SessionUpdatedEvent
from pydantic import TypeAdapter

from openrealtime.backends.speech import TranscriptDelta, TranscriptDone
from openrealtime.engine import EngineContext, InvalidSessionConfig, RealtimeSession

from .test_engine import ScriptedLLM, drain, send
from .test_voice_engine import RATE, EnergyVAD, quiet, tone

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima".split()
TRANSCRIPTION = {"type": "transcription", "audio": {"input": {
    "transcription": {"model": "whisper-1", "language": "en"},
    "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}


class GrowingSTT:
    """One word per 250 ms of audio (so a longer prefix of the same utterance reads on), a final
    "." once the utterance is complete; word probabilities when asked."""

    name = "growing"
    sample_rate = 16_000
    supports_word_probabilities = True

    def __init__(self, delay: float = 0.02):
        self.delay = delay
        self.calls: list[tuple[int, bool]] = []  # (ms of audio, word_probabilities)

    async def transcribe(self, pcm16: bytes, *, language=None, prompt=None, word_probabilities=False
                         ) -> AsyncIterator:
        ms = len(pcm16) // 32
        self.calls.append((ms, word_probabilities))
        await asyncio.sleep(self.delay)
        words = WORDS[:ms // 250]
        text = " ".join(words)
        yield TranscriptDelta(text)
        yield TranscriptDone(text, "en", ms / 1000, [(w, 0.5) for w in words] if word_probabilities else None)


def session(stt: GrowingSTT, **kw) -> RealtimeSession:
    async def resolve(model: str | None) -> ScriptedLLM:
        raise AssertionError("a transcription session never asks the LLM")

    ctx = EngineContext(resolve_llm=resolve, default_model="m", default_instructions="Be brief.",
                        vad=EnergyVAD(), stt=stt, partial_transcript_ms=500)
    return RealtimeSession(ctx, transport="websocket", **kw)


async def speak_into(s: RealtimeSession, pcm: bytes, chunk_ms: int = 100) -> None:
    """Append in chunks, yielding between them so partial decodes can finish (a paced client)."""
    step = RATE * chunk_ms // 1000 * 2
    for i in range(0, len(pcm), step):
        await send(s, {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step]).decode()})
        await asyncio.sleep(0.03)


async def test_session_created_and_updated_have_the_transcription_shape():
    s = session(GrowingSTT(), initial_session={"type": "transcription"})
    await s.start()
    [created] = await drain(s)
    TypeAdapter(SessionCreatedEvent).validate_python(created, strict=True)
    config = created["session"]
    assert config["type"] == "transcription" and config["object"] == "realtime.transcription_session"
    assert config["id"] == s.id and config["include"] is None
    assert set(config) == {"type", "object", "id", "expires_at", "audio", "include"}
    audio_in = config["audio"]["input"]
    assert audio_in["transcription"]["model"] == "growing"  # what really transcribes
    assert audio_in["turn_detection"]["type"] == "server_vad"
    assert "create_response" not in audio_in["turn_detection"]  # nothing is ever answered
    await send(s, {"type": "session.update", "session": {
        **TRANSCRIPTION, "include": ["item.input_audio_transcription.logprobs"]}})
    [updated] = await drain(s)
    TypeAdapter(SessionUpdatedEvent).validate_python(updated, strict=True)
    assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 300
    assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"
    assert updated["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    # A partial update (no `type`) keeps the session's own type.
    await send(s, {"type": "session.update", "session": {"audio": {"input": {"noise_reduction": None}}}})
    [again] = await drain(s)
    assert again["session"]["type"] == "transcription"
    await s.close()


@pytest.mark.parametrize(("initial", "update", "param", "message"), [
    (None, TRANSCRIPTION, "session.type", "transcription session update event to a realtime session"),
    ({"type": "transcription"}, {"type": "realtime", "instructions": "x"}, "session.type",
     "realtime session update event to a transcription session"),
    ({"type": "transcription"}, {"type": "transcription", "instructions": "x"}, "session.instructions", None),
    ({"type": "transcription"}, {"type": "transcription", "audio": {"output": {"voice": "alloy"}}},
     "session.audio.output", None),
    ({"type": "transcription"}, {"type": "translation"}, "session.type", "Supported values"),
])
async def test_refused_updates_name_their_param(initial, update, param, message):
    s = session(GrowingSTT(), initial_session=initial)
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "event_id": "ev1", "session": update})
    [error] = await drain(s)
    assert error["type"] == "error" and error["error"]["param"] == param, error
    assert error["error"]["event_id"] == "ev1"
    if message:
        assert message in error["error"]["message"]
    await s.close()


def test_intent_and_initial_session_decide_the_type():
    with pytest.raises(InvalidSessionConfig) as exc:
        session(GrowingSTT(), session_type="transcription", initial_session={"type": "realtime"})
    assert exc.value.param == "session.type"
    s = session(GrowingSTT(), session_type="transcription")
    assert s.config.wire()["type"] == "transcription"
    with pytest.raises(InvalidSessionConfig) as exc:
        session(GrowingSTT(), initial_session={"type": "transcription", "tools": []})
    assert exc.value.param == "session.tools"


async def test_speech_streams_deltas_before_it_ends_and_no_response_is_made():
    stt = GrowingSTT()
    s = session(stt, initial_session=TRANSCRIPTION)
    await s.start()
    await drain(s)
    await speak_into(s, quiet(300) + tone(3000) + quiet(600))
    events = await drain(s, "conversation.item.input_audio_transcription.completed")
    types = [e["type"] for e in events]
    assert not [t for t in types if t.startswith("response.")], types
    stopped = types.index("input_audio_buffer.speech_stopped")
    deltas = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
    assert any(types.index(d["type"]) < stopped for d in deltas)
    early = [e for e in events[:stopped] if e["type"].endswith("transcription.delta")]
    assert len(early) >= 2, types  # several, as the utterance grew
    completed = events[-1]
    assert "".join(d["delta"] for d in deltas) == completed["transcript"]
    assert completed["transcript"].startswith("alpha bravo charlie")
    assert all("logprobs" not in e for e in [*deltas, completed])  # not asked for
    item_id = events[0]["item_id"]
    assert {d["item_id"] for d in deltas} == {item_id} == {completed["item_id"]}
    # The user item is still added to the conversation, as on the hosted API.
    assert types[stopped + 1:stopped + 4] == ["input_audio_buffer.committed", "conversation.item.added",
                                              "conversation.item.done"]
    assert s.conversation.get(item_id).content[0].transcript == completed["transcript"]
    assert completed["usage"]["type"] == "duration"
    # Partial decodes ran while speaking, never two at once; no word probabilities were asked for.
    assert len(stt.calls) >= 4 and not any(wp for _, wp in stt.calls)
    assert s.ctx.stt_load.final == s.ctx.stt_load.partial == 0
    # response.create is refused in a transcription session.
    await send(s, {"type": "response.create"})
    [error] = await drain(s)
    assert error["type"] == "error" and error["error"]["param"] == "type"
    assert error["error"]["code"] == "unsupported_event"
    await s.close()


async def test_logprobs_when_included():
    stt = GrowingSTT()
    s = session(stt, initial_session={**TRANSCRIPTION, "include": ["item.input_audio_transcription.logprobs"]})
    await s.start()
    await drain(s)
    await speak_into(s, quiet(300) + tone(2000) + quiet(600))
    events = await drain(s, "conversation.item.input_audio_transcription.completed")
    deltas = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
    completed = events[-1]
    assert deltas and all(wp for _, wp in stt.calls)
    for event in deltas:
        assert "".join(lp["token"] for lp in event["logprobs"]) == event["delta"]
        assert all(lp["bytes"] == list(lp["token"].encode()) and lp["logprob"] < 0 for lp in event["logprobs"])
    tokens = "".join(lp["token"] for lp in completed["logprobs"])
    assert tokens == completed["transcript"] == "".join(d["delta"] for d in deltas)
    await s.close()


async def test_partial_decodes_yield_to_turns_being_transcribed():
    stt = GrowingSTT()
    s = session(stt, initial_session=TRANSCRIPTION)
    await s.start()
    await drain(s)
    s.ctx.stt_load.final = 1  # another session's committed turn is being decoded
    await speak_into(s, quiet(300) + tone(2000))
    assert stt.calls == []
    s.ctx.stt_load.final = 0
    await speak_into(s, tone(600))
    assert len(stt.calls) == 1
    # Clearing the buffer mid-speech drops the utterance's partial state.
    await send(s, {"type": "input_audio_buffer.clear"})
    assert s.transcriber._live is None
    await s.close()


async def test_realtime_sessions_get_no_partial_decodes():
    stt = GrowingSTT()
    s = session(stt)
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "transcription": {"model": "whisper-1"}, "turn_detection": {
            "type": "server_vad", "silence_duration_ms": 300, "create_response": False}}}}})
    await speak_into(s, quiet(300) + tone(3000) + quiet(600))
    events = await drain(s, "conversation.item.input_audio_transcription.completed")
    types = [e["type"] for e in events]
    assert len(stt.calls) == 1  # the committed turn only
    assert types.index("conversation.item.input_audio_transcription.delta") > types.index(
        "input_audio_buffer.committed")
    await s.close()


class GuessingSTT(GrowingSTT):
    """GrowingSTT with the quick partial decode the prefill's words use (`partial=True`)."""

    supports_partial = True

    def __init__(self) -> None:
        super().__init__()
        self.partial_calls: list[int] = []  # ms of audio of the partial decodes

    async def transcribe(self, pcm16: bytes, *, language=None, prompt=None, word_probabilities=False,
                         partial=False) -> AsyncIterator:
        if partial:
            self.partial_calls.append(len(pcm16) // 32)
        async for chunk in super().transcribe(pcm16, language=language, prompt=prompt,
                                              word_probabilities=word_probabilities):
            yield chunk


async def test_realtime_sessions_decode_the_words_so_far_only_for_the_llm():
    """A local LLM (`prefills`) and `prefill_words_ms`: while the user speaks, the utterance so
    far is decoded and its words but the last (likely cut) become open prefills; nothing reaches
    the client before the commit, and the turn's transcript is its own final decode."""
    stt, llm = GuessingSTT(), ScriptedLLM(["Sure."])
    llm.prefills = True  # type: ignore[attr-defined]

    async def resolve(model: str | None) -> ScriptedLLM:
        return llm

    ctx = EngineContext(resolve_llm=resolve, default_model="m", default_instructions="Be brief.",
                        vad=EnergyVAD(), stt=stt, speculative_prefill="auto", prefill_words_ms=500)
    s = RealtimeSession(ctx, transport="websocket")
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
               "audio": {"input": {"transcription": {"model": "whisper-1"},
                                   "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    await drain(s)
    await speak_into(s, quiet(300) + tone(2000))
    assert len(stt.partial_calls) >= 2, stt.partial_calls
    opened = [(m[-1].content, p) for m, p in zip(llm.prompts, llm.params, strict=True) if p.open_last]
    assert opened[0][0] == ""  # the start of speech: the prompt up to the user's first word
    said = [content for content, _ in opened[1:]]
    assert said and all(" ".join(WORDS).startswith(c) and c for c in said), said
    assert all(p.max_tokens == 0 and p.cache_key == s.id for _, p in opened)
    before_commit = await drain(s)
    assert not any(e["type"].startswith("conversation.item.input_audio_transcription") for e in before_commit)
    await speak_into(s, quiet(600))
    events = await drain(s, "response.done")
    completed = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == " ".join(WORDS[:(300 + 2000) // 250])  # with the prefix padding
    answer = llm.prompts[-1]
    assert not llm.params[-1].open_last and answer[-1].content == completed["transcript"]
    await s.close()
