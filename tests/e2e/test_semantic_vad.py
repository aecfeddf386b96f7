"""semantic_vad (smart-turn v3) and noise_reduction over WebSocket with the official `openai` SDK.

Real server, real models; speech is synthesized by Piper at test time and noise is generated.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from openrealtime.audio.resample import resample
from openrealtime.backends.smart_turn import default_model_path
from tests import noise_fixtures as nf
from tests.audio_fixtures import silence, speak, speech_available

from .conftest import Server
from .test_voice_websocket import Recorder, client, send_audio

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not speech_available(), reason="no speech synthesizer"),
    pytest.mark.skipif(default_model_path() is None, reason="smart-turn needs `pip install --no-deps pipecat-ai`"),
]
RATE = 24_000
LEAD_MS = 400
MAX_WAIT = {"high": 2000, "medium": 4000, "low": 8000}


def session(turn_detection: dict | None, **audio_input: Any) -> dict:
    return {"type": "realtime", "output_modalities": ["text"],
            "audio": {"input": {"transcription": {"model": "whisper-1"}, "turn_detection": turn_detection,
                                **audio_input}}}


async def run(server: Server, config: dict, audio: bytes, until: str = "input_audio_buffer.committed",
              settle_s: float = 0.0) -> list[dict]:
    """Send all of ``audio`` to a fresh session with ``config``, let it settle, wait for ``until``."""
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        rec = Recorder(conn)
        await rec.wait_for("session.created")
        await conn.session.update(session=config)  # type: ignore[arg-type]
        await rec.wait_for("session.updated")
        await send_audio(conn, audio)
        await asyncio.sleep(settle_s)
        await rec.wait_for(until)
        await asyncio.sleep(0.2)
        rec.task.cancel()
    return rec.events


def first(events: list[dict], kind: str) -> dict:
    return next(e for e in events if e["type"] == kind)


async def test_complete_question_is_committed_sooner_than_server_vad(server: Server):
    question = speak("What is the capital of France?", RATE)
    audio = silence(LEAD_MS, RATE) + question + silence(2500, RATE)
    speech_end = LEAD_MS + nf.speech_ms(question)
    semantic = await run(server, session({"type": "semantic_vad", "eagerness": "high"}), audio,
                         until="response.done")
    server_vad = await run(server, session({"type": "server_vad", "create_response": False}), audio)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "response.done"]
    assert [e["type"] for e in semantic if e["type"] in order] == order
    sem_end = first(semantic, "input_audio_buffer.speech_stopped")["audio_end_ms"]
    vad_end = first(server_vad, "input_audio_buffer.speech_stopped")["audio_end_ms"]
    print(f"end of speech {speech_end:.0f} ms; committed at +{sem_end - speech_end:.0f} ms (semantic_vad high) "
          f"vs +{vad_end - speech_end:.0f} ms (server_vad defaults)")
    assert sem_end < vad_end - 150
    assert sem_end - speech_end < 450
    assert first(semantic, "input_audio_buffer.committed")["item_id"] == \
        first(semantic, "input_audio_buffer.speech_started")["item_id"]


@pytest.mark.parametrize("eagerness", ["low", "medium"])
async def test_pause_mid_sentence_is_not_a_turn_and_the_continuation_joins(server: Server, eagerness: str):
    head, tail = nf.speak_split("I would like to order a, pizza with cheese.", RATE)
    audio = silence(LEAD_MS, RATE) + head + silence(1500, RATE) + tail + silence(1500, RATE)
    events = await run(server, session({"type": "semantic_vad", "eagerness": eagerness, "create_response": False}),
                       audio, until="conversation.item.input_audio_transcription.completed", settle_s=1.0)
    types = [e["type"] for e in events]
    assert types.count("input_audio_buffer.speech_started") == 1, types
    assert types.count("input_audio_buffer.committed") == 1, types
    started = first(events, "input_audio_buffer.speech_started")
    stopped = first(events, "input_audio_buffer.speech_stopped")
    assert started["item_id"] == stopped["item_id"] == first(events, "input_audio_buffer.committed")["item_id"]
    # Committed after the continuation, not during the 1.5 s pause.
    assert stopped["audio_end_ms"] > LEAD_MS + (len(head) + len(tail)) // 48 + 1500
    transcript = first(events, "conversation.item.input_audio_transcription.completed")["transcript"].lower()
    assert "order" in transcript and ("pizza" in transcript or "cheese" in transcript), transcript


@pytest.mark.parametrize("eagerness", ["high", "medium", "low"])
async def test_max_wait_holds_for_an_unfinished_sentence(server: Server, eagerness: str):
    head, _ = nf.speak_split("So I was thinking that, maybe we could go out tonight.", RATE)
    wait = MAX_WAIT[eagerness]
    audio = silence(LEAD_MS, RATE) + head + silence(wait + 1500, RATE)
    events = await run(server, session({"type": "semantic_vad", "eagerness": eagerness, "create_response": False}),
                       audio)
    stopped = first(events, "input_audio_buffer.speech_stopped")
    after = stopped["audio_end_ms"] - (LEAD_MS + nf.speech_ms(head))
    print(f"{eagerness}: committed {after:.0f} ms after the end of speech (max wait {wait} ms)")
    assert wait - 50 <= after <= wait + 400


async def test_switching_turn_detection_mid_session(server: Server):
    utterance = silence(300, RATE) + speak("What do bees make?", RATE) + silence(1500, RATE)
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        rec = Recorder(conn)
        await rec.wait_for("session.created")
        ends = []
        for td in ({"type": "server_vad", "silence_duration_ms": 800, "create_response": False},
                   {"type": "semantic_vad", "eagerness": "high", "create_response": False},
                   None,
                   {"type": "server_vad", "create_response": False},
                   {"type": "semantic_vad", "create_response": False}):
            mark = len(rec.events)
            await conn.session.update(session=session(td))  # type: ignore[arg-type]
            updated = await rec.wait_for("session.updated", after=mark)
            wire = updated["session"]["audio"]["input"]["turn_detection"]
            assert (wire and wire["type"]) == (td and td["type"])
            mark = len(rec.events)
            await send_audio(conn, utterance)
            if td is None:
                await asyncio.sleep(0.5)
                assert not [t for t in rec.types(mark) if t.startswith("input_audio_buffer.speech")]
                await conn.input_audio_buffer.clear()
                await rec.wait_for("input_audio_buffer.cleared", after=mark)
                continue
            started = await rec.wait_for("input_audio_buffer.speech_started", after=mark)
            stopped = await rec.wait_for("input_audio_buffer.speech_stopped", after=mark)
            committed = await rec.wait_for("input_audio_buffer.committed", after=mark)
            assert started["item_id"] == stopped["item_id"] == committed["item_id"]
            ends.append(stopped["audio_end_ms"] - started["audio_start_ms"])
        rec.task.cancel()
    # The same utterance: semantic_vad ends it sooner than an 800 ms silence window.
    assert ends[1] < ends[0] - 300, ends


def noisy(speech24: bytes, kind: str, snr_db: float, seed: int) -> bytes:
    """Speech (24 kHz) with noise at ``snr_db``, 1 s of noise before and after, back at 24 kHz."""
    s = nf.to_float(resample(speech24, RATE, 16_000))
    lead = 16_000
    mixed = nf.mix(s, nf.noise(kind, lead + s.size + lead, seed=seed), snr_db, lead)
    return resample(nf.to_pcm16(mixed), 16_000, RATE)


async def test_noise_reduction_on_noise_alone_and_noisy_speech(server: Server):
    level = nf.active_rms(nf.to_float(speak("What is the capital of France?", 16_000)))
    # 8 s of white noise, then 8 s of babble (8 talkers), at the levels of the noisy speech below.
    noise_alone = np.concatenate([nf.scaled(nf.white(8 * 16_000, seed=5), level, 5),
                                  nf.scaled(nf.babble(8 * 16_000, seed=5), level, 10)])
    noise_only = resample(nf.to_pcm16(noise_alone), 16_000, RATE)
    sentences = ["Please set a timer for ten minutes.", "How far away is the nearest airport?",
                 "Which planet is closest to the sun?", "Could you recommend a good book to read?",
                 "What time does the library open on Sunday?", "Remind me to call my mother this evening."]
    clips = [(s, kind, noisy(speak(s, RATE), kind, snr, i)) for i, s in enumerate(sentences)
             for kind, snr in (("white", 5), ("babble", 10))]
    results: dict[str, dict[str, Any]] = {}
    for name, nr in (("off", None), ("near_field", {"type": "near_field"}), ("far_field", {"type": "far_field"})):
        async with client(server).realtime.connect(model="gpt-realtime") as conn:
            rec = Recorder(conn)
            await rec.wait_for("session.created")
            await conn.session.update(session=session(  # type: ignore[arg-type]
                {"type": "server_vad", "create_response": False}, noise_reduction=nr))
            updated = await rec.wait_for("session.updated")
            assert updated["session"]["audio"]["input"]["noise_reduction"] == nr
            await send_audio(conn, noise_only)
            await asyncio.sleep(0.6)
            false_starts = rec.types().count("input_audio_buffer.speech_started")
            # Noisy speech, committed by hand (without the near-field gate babble never lets a VAD turn end).
            await conn.session.update(session=session(None, noise_reduction=nr))  # type: ignore[arg-type]
            hyps = []
            for _, _, clip in clips:
                mark = len(rec.events)
                await conn.input_audio_buffer.clear()
                await send_audio(conn, clip)
                await conn.input_audio_buffer.commit()
                done = await rec.wait_for("conversation.item.input_audio_transcription.completed", after=mark)
                hyps.append(done["transcript"])
            if name == "near_field":
                # In babble a near-field caller's turn starts and ends on its own.
                mark = len(rec.events)
                await conn.input_audio_buffer.clear()
                await conn.session.update(session=session(  # type: ignore[arg-type]
                    {"type": "server_vad", "create_response": False}, noise_reduction=nr))
                await send_audio(conn, noisy(speak("What is the capital of France?", RATE), "babble", 10, 9))
                done = await rec.wait_for("conversation.item.input_audio_transcription.completed", after=mark)
                turn = [t for t in rec.types(mark) if t.startswith("input_audio_buffer.speech")]
                assert turn == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"], turn
                assert "capital" in done["transcript"].lower(), done
            rec.task.cancel()
        results[name] = {"false_starts": false_starts, "hyps": hyps}
        for kind in ("white", "babble"):
            picked = [(s, h) for (s, k, _), h in zip(clips, hyps, strict=True) if k == kind]
            results[name][kind] = nf.wer([s for s, _ in picked], [h for _, h in picked])
    print({k: (v["false_starts"], round(v["white"], 3), round(v["babble"], 3)) for k, v in results.items()})
    # VAD alone takes the babble for speech: one turn that never ends. Silero hardly ever fires
    # on white noise, so there the check is that suppression adds nothing.
    assert results["off"]["false_starts"] >= 1, results
    # near_field: the level gate holds background talkers back.
    assert results["near_field"]["false_starts"] == 0, results
    assert results["far_field"]["false_starts"] <= results["off"]["false_starts"], results
    # A guard against damage, not a precise comparison: ~45 words per noise type, so one borderline
    # clip moves WER by several points (without the dry-mix floor RNNoise took babble WER from ~0.1
    # to 0.4-1.2). The measured difference is in bench/noise_reduction.py: suppression helps in white
    # noise and costs a few points in babble, whose "noise" is speech itself (the same synthetic voice).
    assert results["near_field"]["white"] <= results["off"]["white"] + 0.1, results
    assert results["near_field"]["babble"] <= results["off"]["babble"] + 0.15, results
    assert results["far_field"]["white"] <= results["off"]["white"] + 0.1, results
    assert results["far_field"]["babble"] <= results["off"]["babble"] + 0.15, results


async def test_a_semantic_vad_turn_is_not_prefilled_by_default(server: Server):
    """`llm_prefill` "auto" (the default, which the shared server runs with) prefills at the pause
    in server_vad turns only (tests/e2e/test_prefill.py has that side, and the open prefill at the
    start of speech that semantic_vad turns get too): a smart-turn decision comes too soon for it."""
    question = speak("Name one colour of the rainbow.", RATE)  # asked nowhere else: no other cache has it
    events = await run(server, {**session({"type": "semantic_vad", "eagerness": "low"}), "max_output_tokens": 16},
                       silence(LEAD_MS, RATE) + question + silence(2500, RATE), until="response.done")
    usage = first(events, "response.done")["response"]["usage"]
    # What precedes the question and the words read while it was spoken can come from the cache,
    # not the end of the turn (ChatML's "<|im_end|>\n<|im_start|>assistant\n", 5 tokens): a
    # prefill at the pause would leave only the last token out.
    assert usage["input_token_details"]["cached_tokens"] <= usage["input_tokens"] - 5, usage
