"""The OpenAI Agents JS SDK's WebRTC transport (`OpenAIRealtimeWebRTC`, from the browser build that
`@openai/agents-realtime` ships, pinned in tests/e2e/js/package.json) in headless Chromium, as a
browser voice app uses it: a page on another origin than the API (a second local HTTP server), an
ephemeral key minted by the test with POST /v1/realtime/client_secrets, the SDK's own
getUserMedia (Chromium's fake microphone playing a spoken question), its SDP offer to
/v1/realtime/calls (with the SDK's own headers, so the browser's CORS preflight is the real one)
and its `oai-events` data channel. The question is heard, transcribed and answered with audio that
is audible in the page; there are no page errors and no SDK errors, and every event the SDK
received passes its own zod schemas (tests/e2e/js/validate.mjs) and openai-python's types.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from ..audio_fixtures import speech_available
from .chromium import fake_mic_args, require_chromium, spoken_wav, static_origin
from .conftest import ARTIFACTS, Server, invalid_events
from .js_sdk import js_sdk_dir
from .test_browser import AUDIBLE_RMS, DONE, WAIT_S  # the same page-side wait and loudness bar
from .zod_check import ZodValidator, format_failure

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not speech_available(), reason="no speech synthesizer for test audio"),
]

QUESTION = "What is the capital of France?"
LEAD_SILENCE_MS = 2500  # the fake mic starts at the SDK's getUserMedia; the call is up well within this


@pytest.fixture(scope="module")
def js_dir() -> Path:
    return js_sdk_dir()


@pytest.fixture(scope="module")
def page_origin(js_dir: Path) -> Iterator[str]:
    """tests/e2e/js (the page and the SDK's browser build) on its own origin: 127.0.0.1, another port."""
    with static_origin(js_dir) as origin:
        yield origin


@pytest.fixture(scope="module")
def zod(js_dir: Path) -> Iterator[ZodValidator]:
    validator = ZodValidator()
    yield validator
    validator.close()


def mint_ephemeral_key(server: Server) -> str:
    r = httpx.post(f"{server.base_url}/v1/realtime/client_secrets",
                   headers={"Authorization": f"Bearer {server.api_key}"},
                   json={"session": {"type": "realtime", "model": "gpt-realtime"}}, timeout=10)
    assert r.status_code == 200, r.text
    value = r.json()["value"]
    assert value.startswith("ek_"), value
    return value


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


async def test_agents_sdk_webrtc_voice_in_browser(chromium_path: Path, server: Server, page_origin: str,
                                                  zod: ZodValidator, tmp_path: Path):
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright

    wav = spoken_wav(tmp_path / "question.wav", QUESTION, LEAD_SILENCE_MS)
    query = urlencode({"server": server.base_url, "key": mint_ephemeral_key(server), "model": "gpt-realtime"})
    console: list[str] = []
    page_errors: list[str] = []
    report: dict[str, Any] = {}
    ARTIFACTS.mkdir(exist_ok=True)

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(chromium_path), headless=True, args=fake_mic_args(wav))
        try:
            context = await browser.new_context(permissions=["microphone"])
            page = await context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            await page.goto(f"{page_origin}/web/agents_webrtc.html?{query}")
            try:
                with contextlib.suppress(PlaywrightTimeout):
                    await page.wait_for_function(DONE, timeout=WAIT_S * 1000, polling=200)
                await page.wait_for_timeout(300)  # trailing events
                report = await page.evaluate("""() => ({events: window.events, eventTimes: window.eventTimes,
                    errors: window.errors, state: window.state, audioLevels: window.audioLevels,
                    maxAudioLevel: window.maxAudioLevel})""")
                report["console"], report["page_errors"] = console, page_errors
                check_call(report, zod)
            except BaseException:
                (ARTIFACTS / "js-agents-webrtc.json").write_text(json.dumps(report or {"console": console}, indent=1))
                raise
            finally:
                with contextlib.suppress(Exception):
                    await page.evaluate("window.hangup()")
        finally:
            await browser.close()


@pytest.fixture
def chromium_path() -> Path:
    return require_chromium()


def check_call(report: dict[str, Any], zod: ZodValidator) -> None:
    state, events = report["state"], report["events"]
    types = [e.get("type") for e in events]
    assert not report["page_errors"], report["page_errors"]
    assert not report["errors"], (report["errors"], [c for c in report["console"] if c.startswith("error")])
    assert state["phase"] == "connected", (state, report["console"][-20:])
    # The SDK read the call id from the answer's Location header (exposed to this origin by CORS).
    assert state["callId"] and state["callId"].startswith("rtc_"), state

    failures = [format_failure(v) for v in map(zod.check, events) if not v["ok"]]
    assert not failures, "\n".join(failures)[:6000]
    invalid = invalid_events(events)
    assert not invalid, invalid

    assert types[0] == "session.created", types[:3]
    assert "error" not in types, [e for e in events if e["type"] == "error"]
    missing = {"input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
               "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
               "response.output_audio_transcript.done", "output_audio_buffer.started", "response.done",
               "output_audio_buffer.stopped"} - set(types)
    assert not missing, (f"missing {sorted(missing)}", types)
    # The SDK's session.update was applied before the user spoke.
    assert state["timings"]["session.updated"] < LEAD_SILENCE_MS, state["timings"]
    updated = [e for e in events if e["type"] == "session.updated"][-1]["session"]
    assert updated["output_modalities"] == ["audio"], updated
    assert updated["audio"]["input"]["turn_detection"]["type"] == "server_vad", updated

    def index(name: str) -> int:
        return types.index(name)

    assert index("input_audio_buffer.speech_started") < index("input_audio_buffer.speech_stopped") \
        < index("input_audio_buffer.committed") < index("response.created") < index("output_audio_buffer.started")
    [transcript] = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert {"capital", "france"} <= words(transcript["transcript"]), transcript["transcript"]
    [done] = [e for e in events if e["type"] == "response.done"]
    status = done["response"]["status"], (done["response"].get("status_details") or {}).get("reason")
    assert status in (("completed", None), ("incomplete", "max_output_tokens")), done  # not failed/cancelled
    [answer] = [e for e in events if e["type"] == "response.output_audio_transcript.done"]
    assert answer["transcript"].strip(), answer
    assert "response.output_audio.delta" not in types  # on WebRTC the audio goes over the media track

    # The SDK's history has the transcribed question and the answer.
    history = state["history"]
    users = [i for i in history if i.get("type") == "message" and i.get("role") == "user"]
    assert users and users[0]["content"][0]["type"] == "input_audio", history
    assert {"capital", "france"} <= words(users[0]["content"][0].get("transcript") or ""), users
    assert any(i.get("role") == "assistant" for i in history), history

    # The reply was audible in the page, after the question (not before it).
    levels = report["audioLevels"]
    spoke_at = report["eventTimes"][index("input_audio_buffer.speech_started")]
    before = [s["rms"] for s in levels if s["t"] < spoke_at]
    assert before and max(before) < AUDIBLE_RMS, max(before, default=None)
    loud_ms = 50 * sum(1 for s in levels if s["rms"] > AUDIBLE_RMS)
    assert report["maxAudioLevel"] > AUDIBLE_RMS and loud_ms >= 300, (report["maxAudioLevel"], loud_ms)
    print(f"\n@openai/agents WebRTC in Chromium heard {transcript['transcript']!r}, answered "
          f"{answer['transcript']!r} (reply audio {loud_ms} ms, peak RMS {report['maxAudioLevel']:.3f}; "
          f"{len(events)} events valid)")
