"""The browser playground at `GET /`, driven in headless Chromium as a user would drive it.

The page is loaded from the server itself; Connect makes it fetch an ephemeral key from
`POST /playground/session` (the test server binds to loopback, so the default
`playground_mode=loopback` hands one out), open the fake microphone (a WAV of a spoken question)
and place a WebRTC call. The test then checks what the user sees: their words and the assistant's
reply in the transcript, `response.done` in the events pane, reply audio and a latency figure.
Screenshots (wide and narrow) go to test-artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..audio_fixtures import speech_available
from .chromium import fake_mic_args, require_chromium, spoken_wav
from .conftest import ARTIFACTS, Server

pytestmark = [pytest.mark.e2e]

QUESTION = "What is the capital of France?"
LEAD_SILENCE_MS = 3000  # Connect -> key -> getUserMedia -> call up happens well within this
WAIT_S = 120
WIDE = {"width": 1280, "height": 860}
NARROW = {"width": 390, "height": 844}
# Predicates are functions, not expression strings: the page's CSP forbids eval, which Playwright
# would otherwise use to poll an expression.
PHASE_IS = "() => window.playground.state.phase === '%s'"

# Done when the user's words and the finished reply are in the transcript, the events pane lists
# response.done, reply audio was heard, and a latency figure is shown — or when the page failed.
DONE = """() => {
    const p = window.playground;
    if (!p) return false;
    if (p.state.phase === "failed") return true;
    const user = document.querySelector("#transcript .msg.user:not(.pending) .text");
    const reply = document.querySelector("#transcript .msg.assistant:not(.pending) .text");
    return !!(user && user.textContent.trim() && reply && reply.textContent.trim()
        && document.querySelector('#events .ev[data-type="response.done"]')
        && p.state.audioArrived && /\\d+ ms/.test(document.getElementById("latency").textContent));
}"""

REPORT = """() => ({
    state: window.playground.state,
    types: window.playground.events.map((e) => e.dir + " " + e.type),
    user: [...document.querySelectorAll("#transcript .msg.user .text")].map((e) => e.textContent),
    assistant: [...document.querySelectorAll("#transcript .msg.assistant .text")].map((e) => e.textContent),
    eventsPane: [...document.querySelectorAll("#events .ev:not([hidden]) .type")].map((e) => e.textContent),
    latency: document.getElementById("latency").textContent,
    replyBadge: [...document.querySelectorAll("#transcript .msg.assistant .badge.lat")].map((e) => e.textContent),
    latencyTitle: document.getElementById("latency-help").title,
    banner: document.getElementById("banner").hidden ? null : document.getElementById("banner-text").textContent,
    status: document.getElementById("status-text").textContent,
})"""


@pytest.fixture
def chromium() -> Path:
    return require_chromium()


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_page_and_assets_carry_no_key(server: Server):
    """The page is static: nothing the server sends for it contains its API key."""
    for path in ("/", "/playground/static/app.js", "/playground/static/style.css"):
        r = httpx.get(f"{server.base_url}{path}", timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert server.api_key not in r.text
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    config = httpx.get(f"{server.base_url}/playground/config", timeout=10).json()
    assert config["mode"] == "loopback" and config["can_mint"] is True
    assert server.api_key not in json.dumps(config)


@pytest.mark.skipif(not speech_available(), reason="no speech synthesizer for test audio")
async def test_playground_voice_turn(chromium: Path, server: Server, tmp_path: Path):
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright

    wav = spoken_wav(tmp_path / "question.wav", QUESTION, LEAD_SILENCE_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[str] = []
    report: dict[str, Any] = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(chromium), headless=True, args=fake_mic_args(wav))
        try:
            context = await browser.new_context(permissions=["microphone"], viewport=WIDE)
            page = await context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            await page.goto(f"{server.base_url}/")
            # The settings form is filled from /playground/config (models of this server).
            await page.wait_for_function("() => document.querySelectorAll('#model option').length > 1")
            await page.fill("#instructions", "Answer in one short sentence.")
            await page.fill("#max-tokens", "40")
            await page.click("#connect")
            try:
                with contextlib.suppress(PlaywrightTimeout):
                    await page.wait_for_function(DONE, timeout=WAIT_S * 1000, polling=200)
                report = await page.evaluate(REPORT)
                report["console"] = console
                check_voice_turn(report, server)
                # Events expand to their JSON.
                await page.click('#events .ev[data-type="response.done"] summary')
                done = json.loads(await page.text_content('#events .ev[data-type="response.done"] pre'))
                assert done["type"] == "response.done" and done["response"]["output"], done
                await page.eval_on_selector('#events .ev[data-type="response.done"]',
                                            "(el) => el.scrollIntoView({block: 'start'})")
                await page.screenshot(path=str(ARTIFACTS / "playground.png"))

                html = await page.content()
                assert server.api_key not in html

                # Narrow screen: one column, nothing wider than the screen.
                await page.set_viewport_size(NARROW)
                await page.wait_for_timeout(300)
                layout = await page.evaluate("""() => {
                    const box = (s) => document.querySelector(s).getBoundingClientRect();
                    return {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
                            conv: box(".conversation").left, settings: box(".settings").left,
                            events: box(".events-panel").left, convBottom: box(".conversation").bottom,
                            settingsTop: box(".settings").top};
                }""")
                assert layout["scrollWidth"] <= layout["innerWidth"], layout
                assert layout["conv"] == layout["settings"] == layout["events"], layout
                assert layout["settingsTop"] >= layout["convBottom"], layout
                await page.screenshot(path=str(ARTIFACTS / "playground-narrow.png"), full_page=True)
            except BaseException:
                (ARTIFACTS / "playground-report.json").write_text(json.dumps(report, indent=1, default=str))
                with contextlib.suppress(Exception):
                    await page.screenshot(path=str(ARTIFACTS / "playground-failed.png"), full_page=True)
                raise
            finally:
                with contextlib.suppress(Exception):
                    await page.evaluate("window.playground.disconnect()")
        finally:
            await browser.close()


def check_voice_turn(report: dict[str, Any], server: Server) -> None:
    state = report["state"]
    summary = {k: report[k] for k in ("status", "banner", "latency", "user", "assistant")}
    assert state["phase"] == "connected" and not state["errors"], (summary, state["errors"], report["console"])
    assert state["keyKind"] == "temporary key" and state["callId"], state
    types = report["types"]
    # The page got an ephemeral key from its own route, then placed the call with it.
    assert "http POST /playground/session → 200" in types, types[:10]
    assert "http POST /v1/realtime/calls → 201" in types, types[:10]
    assert "server session.created" in types
    # Transcript: the user's words and the assistant's reply.
    assert {"capital", "france"} <= words(" ".join(report["user"])), summary
    assert any(text.strip() for text in report["assistant"]), summary
    # Events pane: server events listed, response.done among them; the offer's session is listed too.
    assert "response.done" in report["eventsPane"], report["eventsPane"]
    assert "session (in the offer)" in report["eventsPane"]
    # Audio arrived and was measured; a latency figure is shown, with its method explained.
    assert state["audioArrived"] and state["maxOutputLevel"] > 0.01, state
    assert state["maxMicLevel"] > 0.01, state
    match = re.fullmatch(r"(\d+) ms", report["latency"])
    assert match and 0 < int(match.group(1)) < 30_000, report["latency"]
    assert state["latencies"] and state["latencies"][0]["method"], state["latencies"]
    assert report["replyBadge"] == [report["latency"]], report["replyBadge"]  # also on the reply itself
    assert "end of your speech" in report["latencyTitle"].lower() or "end of speech" in report["latencyTitle"].lower()
    print(f"\nplayground heard {report['user']!r}, answered {report['assistant']!r}, latency {report['latency']} "
          f"({state['latencies'][0]['method']})")


async def test_playground_error_messages_and_typed_turn(chromium: Path, server: Server):
    """Wrong key, unreachable server, refused microphone: each gets a clear message. With the mic
    refused the page still connects, and a typed message gets an answer."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(chromium), headless=True, args=fake_mic_args())
        try:
            context = await browser.new_context(permissions=["microphone"], viewport=WIDE)

            # A wrong pasted key: 401, said plainly, with Reconnect offered.
            page = await context.new_page()
            await page.goto(f"{server.base_url}/")
            await page.fill("#own-key", "sk-wrong")
            await page.click("#connect")
            await page.wait_for_function(PHASE_IS % "failed", timeout=20_000)
            text = await page.text_content("#banner-text")
            assert "rejected" in text and "401" in text, text
            assert await page.is_visible("#reconnect")
            # An unknown ephemeral key is rejected the same way.
            await page.fill("#own-key", "ek_0000")
            await page.click("#reconnect")
            await page.wait_for_function(PHASE_IS % "failed", timeout=20_000)
            assert "rejected" in await page.text_content("#banner-text")
            await page.close()

            # The server unreachable (the request never gets through).
            page = await context.new_page()
            await page.goto(f"{server.base_url}/")
            await page.route("**/playground/session", lambda route: route.abort())
            await page.click("#connect")
            await page.wait_for_function(PHASE_IS % "failed", timeout=20_000)
            assert "Cannot reach the server" in await page.text_content("#banner-text")
            await page.close()

            # The microphone refused: a warning, the call still comes up, and typing works.
            page = await context.new_page()
            await page.add_init_script("""navigator.mediaDevices.getUserMedia = () =>
                Promise.reject(new DOMException("Permission denied", "NotAllowedError"));""")
            await page.goto(f"{server.base_url}/")
            await page.select_option("#modality", "text")
            await page.fill("#max-tokens", "20")
            await page.click("#connect")
            await page.wait_for_function(PHASE_IS % "connected", timeout=30_000)
            assert "Microphone access was refused" in await page.text_content("#banner-text")
            await page.fill("#message", "Say hello.")
            await page.press("#message", "Enter")
            await page.wait_for_function(
                """() => document.querySelector('#events .ev[data-type="response.done"]')
                    && document.querySelector("#transcript .msg.assistant:not(.pending) .text")""",
                timeout=90_000)
            sent = await page.evaluate("window.playground.events.filter((e) => e.dir === 'client').map((e) => e.type)")
            assert sent[-2:] == ["conversation.item.create", "response.create"], sent
            user = await page.text_content("#transcript .msg.user .text")
            assert user == "Say hello."
            assert re.fullmatch(r"\d+ ms", await page.text_content("#latency"))
            # Filtering the events pane by type.
            await page.fill("#event-filter", "response.done")
            shown = await page.evaluate(
                "[...document.querySelectorAll('#events .ev:not([hidden]) .type')].map((e) => e.textContent)")
            assert shown and set(shown) == {"response.done"}, shown
            # Expandable JSON.
            await page.click('#events .ev[data-type="response.done"] summary')
            body = json.loads(await page.text_content('#events .ev[data-type="response.done"] pre'))
            assert body["type"] == "response.done" and body["response"]["status"] in ("completed", "incomplete")
            # Reconnect: a fresh key and a new call.
            first_call = await page.evaluate("window.playground.state.callId")
            await page.click("#reconnect")
            await page.wait_for_function(PHASE_IS % "connected", timeout=30_000)
            second_call = await page.evaluate("window.playground.state.callId")
            assert second_call and second_call != first_call
            await page.click("#disconnect")
            await page.wait_for_function(PHASE_IS % "closed", timeout=10_000)
        finally:
            await browser.close()
