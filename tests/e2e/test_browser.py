"""A real browser talks to the server: headless Chromium (Debian's `chromium`, driven by Playwright
through `executable_path`) loads a plain page that does what a browser app does — getUserMedia,
RTCPeerConnection, the `oai-events` data channel, the SDP offer POSTed to `/v1/realtime/calls` —
with Chromium's fake microphone playing a WAV of synthesized speech. The user is heard,
transcribed and answered with audible audio, and every event the page received validates strictly
against `openai.types.realtime`.

The page is served from its own origin (another port), so the browser also checks the server's
CORS answer. Chromium comes from `scripts/install-system-deps.sh`: without it the test skips
locally, and fails in CI, where it must run.
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

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not speech_available(), reason="no speech synthesizer for test audio"),
]

PAGE_DIR = Path(__file__).resolve().parent / "browser"
QUESTION = "What is the capital of France?"
LEAD_SILENCE_MS = 2000  # the fake mic starts at getUserMedia; the call is up well within this
SESSION: dict[str, Any] = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "instructions": "Answer in one short sentence.",
    "max_output_tokens": 60,
    "audio": {"input": {"transcription": {"model": "whisper-1"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}},
}
# RMS of float samples in [-1, 1]: speech is around 0.05-0.2; decoded silence stays near 0.
AUDIBLE_RMS = 0.01
WAIT_S = 90
DONE = """() => {
    if (!window.state || !window.events) return false;
    const types = new Set(window.events.map((e) => e.type));
    return window.state.phase === "failed" || (types.has("response.done")
        && types.has("conversation.item.input_audio_transcription.completed")
        && types.has("output_audio_buffer.stopped"));
}"""


@pytest.fixture
def chromium() -> Path:
    """Chromium's path (see chromium.py: skips locally without it, fails in CI)."""
    return require_chromium()


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """The test page on its own origin: a tiny static server on 127.0.0.1, another port."""
    with static_origin(PAGE_DIR) as origin:
        yield origin


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def index(types: list[str], name: str) -> int:
    assert name in types, (name, types)
    return types.index(name)


def check_cors(server: Server, origin: str) -> None:
    """The browser's preflight for the offer POST must pass, or the page cannot call the server."""
    r = httpx.options(f"{server.base_url}/v1/realtime/calls", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=10)
    allowed = r.headers.get("access-control-allow-origin")
    assert r.status_code == 200 and allowed in ("*", origin), \
        f"CORS preflight from {origin} refused ({r.status_code}, allow-origin={allowed!r}): add CORSMiddleware"


def mic_wav(path: Path) -> Path:
    """The question, spoken, with silence around it: PCM16 mono 48 kHz, what Chromium's fake mic reads."""
    return spoken_wav(path, QUESTION, LEAD_SILENCE_MS)


async def test_browser_voice_conversation(chromium: Path, server: Server, page_origin: str, tmp_path: Path):
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright

    check_cors(server, page_origin)
    wav = mic_wav(tmp_path / "question.wav")
    ARTIFACTS.mkdir(exist_ok=True)
    query = urlencode({"server": server.base_url, "key": server.api_key, "session": json.dumps(SESSION)})
    console: list[str] = []
    report: dict[str, Any] = {}

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(chromium), headless=True, args=fake_mic_args(wav))
        try:
            context = await browser.new_context(permissions=["microphone"], viewport={"width": 900, "height": 900})
            page = await context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            await page.goto(f"{page_origin}/client.html?{query}")
            try:
                with contextlib.suppress(PlaywrightTimeout):
                    await page.wait_for_function(DONE, timeout=WAIT_S * 1000, polling=200)
                report = await page.evaluate("""async () => ({
                    events: window.events, state: window.state, stats: await window.stats(),
                    maxAudioLevel: window.maxAudioLevel, maxMicLevel: window.maxMicLevel,
                    audioLevels: window.audioLevels})""")
                report["console"] = console
                check_conversation(report)
            except BaseException:
                (ARTIFACTS / "browser-voice-events.json").write_text(json.dumps(report, indent=1))
                raise
            finally:
                with contextlib.suppress(Exception):
                    await page.screenshot(path=str(ARTIFACTS / "browser-voice.png"), full_page=True)
                with contextlib.suppress(Exception):
                    await page.evaluate("window.hangup()")
        finally:
            await browser.close()


def check_conversation(report: dict[str, Any]) -> None:
    state, events = report["state"], report["events"]
    types = [e.get("type") for e in events]
    summary = {k: state.get(k) for k in ("phase", "connectionState", "dataChannelState", "errors", "timings")}
    assert not state["errors"] and state["phase"] != "failed", summary
    assert state["answerStatus"] == 201 and state["callId"], summary
    assert state["connectionState"] == "connected" and state["dataChannelState"] == "open", summary

    invalid = invalid_events(events)
    assert not invalid, invalid

    assert types[0] == "session.created", types[:3]
    updated = [e for e in events if e["type"] == "session.updated"]
    assert updated and updated[-1]["session"]["output_modalities"] == ["audio"], types
    assert updated[-1]["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
    assert "error" not in types, [e for e in events if e["type"] == "error"]
    missing = {"input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
               "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
               "response.output_audio_transcript.done", "output_audio_buffer.started", "response.done",
               "output_audio_buffer.stopped"} - set(types)
    assert not missing, (f"missing {sorted(missing)}; the mic peaked at RMS {report['maxMicLevel']:.3f}", summary,
                         types)

    # The fake microphone really carried the speech, and the call was up before the speech began.
    assert report["maxMicLevel"] > AUDIBLE_RMS, report["maxMicLevel"]
    assert state["timings"]["session.updated"] < LEAD_SILENCE_MS, state["timings"]

    assert index(types, "input_audio_buffer.speech_started") < index(types, "input_audio_buffer.speech_stopped") \
        < index(types, "input_audio_buffer.committed") < index(types, "response.created") \
        < index(types, "output_audio_buffer.started")
    committed = events[index(types, "input_audio_buffer.committed")]
    [transcript] = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcript["item_id"] == committed["item_id"]
    assert {"capital", "france"} <= words(transcript["transcript"]), transcript["transcript"]

    response_id = events[index(types, "response.created")]["response"]["id"]
    [answer] = [e for e in events if e["type"] == "response.output_audio_transcript.done"]
    assert answer["response_id"] == response_id and answer["transcript"].strip(), answer
    [done] = [e for e in events if e["type"] == "response.done"]
    # A normal answer: complete, or capped by the session's max_output_tokens (SmolLM2 rambles).
    assert done["response"]["id"] == response_id, done
    assert done["response"]["status"] == "completed" or done["response"]["status_details"] == {
        "type": "incomplete", "reason": "max_output_tokens"}, done
    assert events[index(types, "output_audio_buffer.started")]["response_id"] == response_id
    assert "response.output_audio.delta" not in types  # on WebRTC the audio goes over the media track

    # The reply was audible in the page: WebAudio measured it rise well above the silence that the
    # track carried while the user was speaking.
    assert state["remoteTrack"] and state["audioElementPlaying"], summary
    assert report["stats"]["inbound"] and report["stats"]["inbound"]["packetsReceived"] > 0, report["stats"]
    levels = report["audioLevels"]
    before_reply = [s["rms"] for s in levels if s["t"] < state["timings"]["speech_started"]]
    assert before_reply and max(before_reply) < AUDIBLE_RMS, max(before_reply, default=None)
    assert report["maxAudioLevel"] > AUDIBLE_RMS, (report["maxAudioLevel"], report["stats"])
    loud_ms = 50 * sum(1 for s in levels if s["rms"] > AUDIBLE_RMS)
    assert loud_ms >= 300, loud_ms
    print(f"\nbrowser heard {transcript['transcript']!r}, answered {answer['transcript']!r} "
          f"(reply audio {loud_ms} ms, peak RMS {report['maxAudioLevel']:.3f}; {len(events)} events valid; "
          f"ICE pair {report['stats']['pair']})")
