"""GET /metrics on the real server: keyed like /v1/models, and the counters follow real sessions.

Parsed with prometheus_client's own parser (tests/metrics_text.py), after real turns.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from tests.audio_fixtures import silence, speak, speech_available
from tests.metrics_text import parse, total, value

from .conftest import Server, client, collect
from .webrtc_client import hangup, open_call

pytestmark = pytest.mark.e2e


async def scrape(server: Server) -> dict:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {server.api_key}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def settled(server: Server, name: str, want: float, **labels: str) -> dict:
    """Scrape until a gauge reaches `want` (sessions close a moment after the client goes)."""
    for _ in range(50):
        samples = await scrape(server)
        if value(samples, name, **labels) == want:
            return samples
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name}{labels} stayed at {value(samples, name, **labels)}, expected {want}")


async def test_metrics_need_the_api_key(server: Server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        missing = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer sk-wrong"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert "openrealtime_" not in missing.text


async def test_a_websocket_turn_moves_the_counters(server: Server):
    before = await scrape(server)
    assert value(before, "openrealtime_process_resident_memory_bytes") > 50 * 1024 * 1024  # models are loaded
    assert value(before, "openrealtime_process_threads") > 1
    assert value(before, "openrealtime_process_open_fds") > 3
    assert value(before, "openrealtime_asyncio_tasks") >= 1
    active = value(before, "openrealtime_sessions_active", transport="websocket")
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        during = await scrape(server)
        assert value(during, "openrealtime_sessions_active", transport="websocket") == active + 1
        await conn.send({"type": "conversation.item.delete", "item_id": "no-such-item", "event_id": "m1"})
        error = (await collect(conn, "error"))[-1]["error"]
        assert error["code"] == "item_not_found"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]})
        await conn.response.create(response={"max_output_tokens": 8})
        done = (await collect(conn, "response.done"))[-1]["response"]
    after = await settled(server, "openrealtime_sessions_active", active, transport="websocket")
    assert value(after, "openrealtime_sessions_total", transport="websocket") == \
        value(before, "openrealtime_sessions_total", transport="websocket") + 1
    status = done["status"]
    assert value(after, "openrealtime_responses_total", status=status) == \
        value(before, "openrealtime_responses_total", status=status) + 1
    assert total(after, "openrealtime_responses_total") == total(before, "openrealtime_responses_total") + 1
    assert value(after, "openrealtime_errors_sent_total", code="item_not_found") == \
        value(before, "openrealtime_errors_sent_total", code="item_not_found") + 1
    # delete, session.update, item.create, response.create
    assert value(after, "openrealtime_events_received_total") >= \
        value(before, "openrealtime_events_received_total") + 4
    # The text turn's stages, timed from response.create (no speech behind it).
    text_turn = {"since": "response_created", "transport": "websocket"}
    assert value(after, "openrealtime_turns_total", **text_turn) == \
        value(before, "openrealtime_turns_total", **text_turn) + 1
    first_token = {"stage": "llm_first_token", **text_turn}
    assert value(after, "openrealtime_turn_stage_seconds_count", **first_token) == \
        value(before, "openrealtime_turn_stage_seconds_count", **first_token) + 1
    seconds = value(after, "openrealtime_turn_stage_seconds_sum", **first_token) - \
        value(before, "openrealtime_turn_stage_seconds_sum", **first_token)
    assert 0 < seconds < 30, seconds
    assert value(after, "openrealtime_turn_stage_seconds_bucket", le="+Inf", **first_token) == \
        value(after, "openrealtime_turn_stage_seconds_count", **first_token)
    # The LLM scheduler's own series: the reply's tokens, its decode steps and its queue wait.
    generated = total(after, "openrealtime_llm_tokens_total", kind="generated") - \
        total(before, "openrealtime_llm_tokens_total", kind="generated")
    assert generated == done["usage"]["output_tokens"] > 0
    assert total(after, "openrealtime_llm_tokens_total", kind="prompt") > \
        total(before, "openrealtime_llm_tokens_total", kind="prompt")
    steps = "openrealtime_llm_batch_sequences_count"
    assert total(after, steps) > total(before, steps)
    assert total(after, "openrealtime_llm_queue_wait_seconds_count") == \
        total(before, "openrealtime_llm_queue_wait_seconds_count") + 1
    decode = "openrealtime_llm_decode_seconds_total"
    assert total(after, decode) > total(before, decode)
    assert total(after, "openrealtime_llm_active_requests") == 0


RATE = 24_000


@pytest.mark.skipif(not speech_available(), reason="needs Piper to synthesize the question")
async def test_a_spoken_turn_fills_the_stage_histograms(server: Server):
    """Every stage of a spoken turn, timed from the end of the speech as the server received it."""
    question = speak("What is two plus two?", RATE)
    before = await scrape(server)
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["audio"],
            "instructions": "Answer in one short sentence.",
            "audio": {"input": {"transcription": {"model": "whisper-1"},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
        await collect(conn, "session.updated")

        async def mic() -> None:  # in real time, 100 ms chunks, like a microphone
            pcm = silence(300, RATE) + question + silence(1200, RATE)
            step = RATE // 10 * 2
            for i in range(0, len(pcm), step):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())
                await asyncio.sleep(0.1)

        sending = asyncio.create_task(mic())
        try:
            await collect(conn, "response.done")
        finally:
            await sending
    after = await scrape(server)
    spoken = {"since": "speech_end", "transport": "websocket"}

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **spoken, **labels) - value(before, name, **spoken, **labels)

    assert delta("openrealtime_turns_total") == 1
    for stage in ("speech_stopped", "stt_done", "prompt_ready", "llm_first_token", "first_clause",
                  "tts_first_chunk", "audio_out"):
        assert delta("openrealtime_turn_stage_seconds_count", stage=stage) == 1, stage
    # The VAD decides after the 500 ms silence wait (plus a VAD frame or two, and chunking).
    decided = delta("openrealtime_turn_stage_seconds_sum", stage="speech_stopped")
    assert 0.45 <= decided < 1.5, decided
    first_audio = delta("openrealtime_turn_stage_seconds_sum", stage="audio_out")
    assert decided < first_audio < 30, (decided, first_audio)


async def test_a_webrtc_call_is_counted_while_it_lasts(server: Server):
    before = await scrape(server)
    calls = value(before, "openrealtime_webrtc_calls_active")
    sessions = value(before, "openrealtime_sessions_active", transport="webrtc")
    peer, call_id, _ = await open_call(server)
    try:
        during = await scrape(server)
        assert value(during, "openrealtime_webrtc_calls_active") == calls + 1
        assert value(during, "openrealtime_sessions_active", transport="webrtc") == sessions + 1
    finally:
        assert (await hangup(server, call_id)).status_code == 200
        await peer.close()
    after = await settled(server, "openrealtime_webrtc_calls_active", calls)
    assert value(after, "openrealtime_sessions_active", transport="webrtc") == sessions
    assert value(after, "openrealtime_sessions_total", transport="webrtc") == \
        value(before, "openrealtime_sessions_total", transport="webrtc") + 1
