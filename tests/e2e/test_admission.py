"""Many callers on one box (issue 11): admission control, /readyz, and the drain on SIGTERM.

Real server processes: one with ``OPENREALTIME_MAX_SESSIONS=2`` for the session counter (WebSocket
sessions and WebRTC calls share it; every way a session ends gives its slot back), one started
without ``--preload`` for /readyz during the warm start, and short-lived ones that get a SIGTERM.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.metrics_text import value

from .conftest import Server, client, collect, start_server, stop_server
from .test_metrics import scrape
from .webrtc_client import Peer, hangup, open_call, post_offer, wait_for_log

pytestmark = pytest.mark.e2e

# No speech stages: these tests are about sessions, not models (and the CPU is shared).
QUIET = {"OPENREALTIME_VAD_ENABLED": "false", "OPENREALTIME_STT_ENABLED": "false",
         "OPENREALTIME_TTS_ENABLED": "false", "OPENREALTIME_TURN_DETECTOR_ENABLED": "false",
         "OPENREALTIME_NOISE_SUPPRESSOR": "off"}
WS_PATHS = ["/v1/realtime?model=gpt-realtime", "/api/v1/realtime/session?key=client-7&protocol=realtime"]


def assert_clean_log(server: Server) -> None:
    text = server.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Task was destroyed" not in text, text[-4000:]
    assert not re.search(r"^(\S+ \S+ )?ERROR", text, re.M), text[-4000:]


@pytest.fixture(scope="module")
def limited() -> Iterator[Server]:
    server = start_server({**QUIET, "OPENREALTIME_MAX_SESSIONS": "2"}, name="admission")
    yield server
    stop_server(server)
    assert_clean_log(server)


def auth(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


SESSION_IDS: dict[ClientConnection, str] = {}


async def open_ws(server: Server, path: str = WS_PATHS[0]) -> ClientConnection:
    """A WebSocket session, once its `session.created` arrived."""
    ws = await websockets.connect(server.ws_url + path, additional_headers=auth(server))
    created = json.loads(await asyncio.wait_for(ws.recv(), 20))
    assert created["type"] == "session.created", created
    SESSION_IDS[ws] = created["session"]["id"]
    return ws


async def close_ws(server: Server, ws: ClientConnection) -> None:
    """Close a session and wait until the server has ended it (its slot is released right after the log line)."""
    await ws.close()
    await wait_for_log(server, rf"websocket session {SESSION_IDS.pop(ws)} closed")


async def ws_refusal(server: Server, path: str = WS_PATHS[0]) -> tuple[int, Any, dict[str, Any]]:
    """(status, headers, body) of a WebSocket upgrade the server refused."""
    with pytest.raises(websockets.InvalidStatus) as exc:
        ws = await websockets.connect(server.ws_url + path, additional_headers=auth(server))
        await ws.close()
    response = exc.value.response
    return response.status_code, response.headers, json.loads(response.body)


def assert_refused(status: int, headers: Any, body: dict[str, Any], expected: int, code: str) -> None:
    """The OpenAI error shape, with the status and code that say why, and (`headers` given) when to come back."""
    assert status == expected, body
    assert set(body["error"]) == {"type", "code", "message", "param"}, body
    kind = "rate_limit_error" if expected == 429 else "server_error"
    assert (body["error"]["type"], body["error"]["code"], body["error"]["param"]) == (kind, code, None), body
    assert body["error"]["message"], body
    if headers is not None:
        assert headers["retry-after"].isdigit(), headers


async def assert_full(server: Server) -> None:
    """Every way of starting a session is refused with 429 `session_limit_reached`."""
    for path in WS_PATHS:
        assert_refused(*await ws_refusal(server, path), 429, "session_limit_reached")
    peer = Peer()
    try:
        offer = await peer.offer()
        for dialect in ("sdp", "json"):
            response = await post_offer(server, dialect, offer)
            assert_refused(response.status_code, response.headers, response.json(), 429, "session_limit_reached")
    finally:
        await peer.close()


async def accepted_soon(server: Server, wait_s: float = 15) -> ClientConnection:
    """A new WebSocket session, retried while the server finishes tearing down the one that ended."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await open_ws(server)
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 429, exc.response.body
            if time.monotonic() > deadline:
                raise AssertionError("no slot came back") from exc
            await asyncio.sleep(0.2)


@pytest.fixture
async def sockets(limited: Server) -> AsyncIterator[list[ClientConnection]]:
    """WebSockets a test opened; closed even when it fails, so the next test starts with no sessions."""
    opened: list[ClientConnection] = []
    yield opened
    for ws in opened:
        await close_ws(limited, ws)


# ------------------------------------------------------------------ admission control


async def test_sessions_beyond_the_limit_are_refused_and_a_closed_one_frees_its_slot(
        limited: Server, sockets: list[ClientConnection]):
    async with client(limited).realtime.connect(model="gpt-realtime") as sdk:  # the openai SDK holds one
        await collect(sdk, "session.created")
        sockets.append(await open_ws(limited, WS_PATHS[1]))  # Inworld's URL counts the same
        await assert_full(limited)
        async with httpx.AsyncClient(base_url=limited.base_url) as h:  # full is still ready (and alive)
            assert (await h.get("/readyz")).json() == {"status": "ready"}
            assert (await h.get("/healthz")).status_code == 200
    sockets.append(await accepted_soon(limited))  # the SDK's session ended: its slot is back
    await assert_full(limited)  # ... and only that one


async def test_an_abrupt_disconnect_frees_its_slot(limited: Server, sockets: list[ClientConnection]):
    refused = {"reason": "session_limit_reached"}
    before = value(await scrape(limited), "openrealtime_sessions_refused_total", **refused)
    sockets.append(await open_ws(limited))
    gone = await open_ws(limited)
    assert_refused(*await ws_refusal(limited), 429, "session_limit_reached")
    gone.transport.abort()  # no close frame: the TCP connection just goes away
    await wait_for_log(limited, rf"websocket session {SESSION_IDS.pop(gone)} closed")
    sockets.append(await open_ws(limited))  # its slot is back
    assert_refused(*await ws_refusal(limited), 429, "session_limit_reached")
    # /metrics counts each refusal (and nothing else: the admitted sessions are not refusals)
    assert value(await scrape(limited), "openrealtime_sessions_refused_total", **refused) == before + 2


async def test_failed_call_negotiations_give_their_slots_back(limited: Server, sockets: list[ClientConnection]):
    sockets.append(await open_ws(limited))  # one slot left
    peer = Peer()
    offer = await peer.offer()
    await peer.close()
    garbage = re.sub(r"^a=fingerprint:(\S+) \S+", r"a=fingerprint:\1 garbage", offer, flags=re.M)
    async with httpx.AsyncClient(base_url=limited.base_url, headers=auth(limited), timeout=30) as h:
        for _ in range(3):  # a leaked slot would make the second attempt a 429
            for content, failure in ((garbage, "fingerprint"),  # refused before a call exists
                                     (offer.replace("m=audio", "m=video"), "rejected"),  # by the peer connection
                                     ("v=0\r\nnot sdp", "")):
                response = await h.post("/v1/realtime/calls", content=content,
                                        headers={"Content-Type": "application/sdp"})
                assert response.status_code == 400, response.text
                assert failure in response.json()["error"]["message"], response.text
            response = await h.post("/v1/realtime/calls", json={"sdp": offer, "session": {"tools": 5}})
            assert response.status_code == 400, response.text  # a session config that cannot start
            response = await h.post("/v1/realtime/calls", content=b"{oops",
                                    headers={"Content-Type": "application/json"})
            assert response.status_code == 400, response.text
    sockets.append(await open_ws(limited))  # the last slot is free at once (released before the 400)
    assert_refused(*await ws_refusal(limited), 429, "session_limit_reached")  # and counted exactly


async def test_a_call_holds_its_slot_until_it_ends(limited: Server, sockets: list[ClientConnection]):
    peer, call_id, _ = await open_call(limited, "sdp")
    try:
        sockets.append(await open_ws(limited))
        await assert_full(limited)
        assert (await hangup(limited, call_id)).status_code == 200
        other = await open_ws(limited)  # the call's slot is back (hangup returns once it is torn down)
        assert_refused(*await ws_refusal(limited), 429, "session_limit_reached")
        await close_ws(limited, other)
    finally:
        await peer.close()
    peer, call_id, _ = await open_call(limited, "json")
    await peer.close()  # the client hangs up on its side
    await wait_for_log(limited, rf"call {call_id} ended")
    sockets.append(await open_ws(limited))


async def test_the_queue_time_bound_refuses_new_sessions_while_transcripts_queue_up():
    """`max_queue_wait_ms`: four transcriptions posted at once queue on the one Whisper worker (each
    a single 28 s window, about half a second), so work waits ~0.5-1.5 s for it; meanwhile new
    sessions of both transports get the 429, live ones go on, and once the waits are over new
    sessions are accepted again."""
    import io
    import wave

    from tests.audio_fixtures import silence, speak

    server = start_server({**QUIET, "OPENREALTIME_STT_ENABLED": "true", "OPENREALTIME_MAX_QUEUE_WAIT_MS": "100"},
                          name="admission-queue")
    try:
        live = await open_ws(server)
        speech = speak("What is the capital of France?", 16000)
        pcm = speech + silence(28_000 - len(speech) // 32, 16000)  # 28 s: the full 30 s window
        buf = io.BytesIO()
        with wave.open(buf, "wb") as fh:
            fh.setnchannels(1)
            fh.setsampwidth(2)
            fh.setframerate(16000)
            fh.writeframes(pcm)
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth(server), timeout=60) as http:
            async def transcribe() -> str:
                response = await http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                                           files={"file": ("q.wav", buf.getvalue(), "audio/wav")})
                assert response.status_code == 200, response.text
                return response.json()["text"]

            texts = await asyncio.gather(*(transcribe() for _ in range(4)))
            assert all("capital" in t.lower() for t in texts), texts
            level = value(await scrape(server), "openrealtime_queue_wait_level_seconds", queue="stt")
            assert level > 0.1, level
            status, headers, body = await ws_refusal(server)
            assert_refused(status, headers, body, 429, "session_limit_reached")
            assert "stt" in body["error"]["message"], body
            peer = Peer()
            try:
                response = await post_offer(server, "sdp", await peer.offer())
                assert_refused(response.status_code, response.headers, response.json(), 429, "session_limit_reached")
            finally:
                await peer.close()
            await live.send(json.dumps({"type": "session.update", "session": {"instructions": "still here"}}))
            async with asyncio.timeout(20):
                while (event := json.loads(await live.recv()))["type"] != "session.updated":
                    assert event["type"] != "error", event
            assert event["session"]["instructions"] == "still here"
            refused = value(await scrape(server), "openrealtime_sessions_refused_total", reason="session_limit_reached")
            assert refused >= 2, refused
            other = await accepted_soon(server, wait_s=20)  # the window (10 s) forgets the waits
            await close_ws(server, other)
        await close_ws(server, live)
    finally:
        stop_server(server)
    assert_clean_log(server)


# ------------------------------------------------------------------ readiness


async def test_readyz_is_503_while_the_models_load_then_200():
    # Every speech stage on and no --preload: the server listens while the models load (about 2 s).
    server = start_server(name="readyz", preload=False)
    try:
        answers: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as h:  # no API key: probes have none
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                response = await h.get("/readyz")
                answers.append(response)
                if response.status_code == 200:
                    break
                assert (await h.get("/healthz")).status_code == 200  # alive all along
                await asyncio.sleep(0.05)
            assert "Ready: all models loaded" in server.log_text()  # 200 only once the warm start is done
            later = [await h.get("/readyz") for _ in range(5)]
        first, last = answers[0], answers[-1]
        assert first.status_code == 503, first.text
        body = first.json()
        assert body["error"]["code"] == "not_ready" and body["error"]["type"] == "server_error"
        assert body["error"]["param"] is None and body["failed"] == []
        assert body["loading"] and all(name.split()[0] in ("LLM", "VAD", "STT", "TTS", "end-of-turn", "noise")
                                       for name in body["loading"]), body
        loading = [a.json()["loading"] for a in answers[:-1]]
        assert all(set(b) <= set(a) for a, b in itertools.pairwise(loading)), loading  # only shrinks
        assert (last.status_code, last.json()) == (200, {"status": "ready"})
        assert all(a.status_code == 200 for a in later)
    finally:
        stop_server(server)
    assert_clean_log(server)


# ------------------------------------------------------------------ drain on SIGTERM


async def wait_draining(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as h:
        for _ in range(100):
            response = await h.get("/readyz")
            if response.status_code == 503:
                assert_refused(503, None, response.json(), 503, "draining")
                return
            await asyncio.sleep(0.05)
    raise AssertionError("/readyz never said draining")


def exit_code(server: Server, wait_s: float) -> int:
    try:
        return server.proc.wait(timeout=wait_s)
    except Exception:
        server.proc.kill()
        server.proc.wait()
        raise


async def test_sigterm_drains_the_live_sessions_then_exits_cleanly():
    server = start_server({**QUIET, "OPENREALTIME_DRAIN_GRACE_S": "3"}, name="drain")
    peer: Peer | None = None
    try:
        ws = await open_ws(server)
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime",
                                                                        "output_modalities": ["text"]}}))

        async def turn(text: str) -> dict[str, Any]:
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
            await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 8}}))
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != "response.done":
                pass
            return event["response"]

        await turn("Hello!")  # mid-conversation
        peer, call_id, _ = await open_call(server, "sdp")
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await wait_draining(server)
        # The live session goes on during the grace period...
        assert (await turn("One more thing."))["status"] in ("completed", "incomplete")
        assert time.monotonic() - signalled < 3, "the turn should have fitted in the grace period"
        # ... while new ones are refused.
        for path in WS_PATHS:
            assert_refused(*await ws_refusal(server, path), 503, "draining")
        other = Peer()
        try:
            response = await post_offer(server, "sdp", await other.offer())
        finally:
            await other.close()
        assert_refused(response.status_code, response.headers, response.json(), 503, "draining")
        samples = await scrape(server)  # a fresh server: exactly the three refusals above
        assert value(samples, "openrealtime_sessions_refused_total", reason="draining") == 3
        assert value(samples, "openrealtime_sessions_refused_total", reason="session_limit_reached") == 0
        assert server.proc.poll() is None
        # Then both sessions are closed: a close frame for the WebSocket, a teardown for the call.
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code == 1001 and time.monotonic() - signalled >= 2.9
        await asyncio.wait_for(peer.closed.wait(), 15)
        assert exit_code(server, 20) == 0
        assert time.monotonic() - signalled < 15
    finally:
        if peer is not None:
            await peer.close()
        stop_server(server)
    assert_clean_log(server)
    text = server.log_text()
    assert "Received SIGTERM: draining" in text and "Closing 2 session(s) after the grace period" in text, text
    assert f"call {call_id} ended (server draining)" in text, text


async def test_the_drain_ends_as_soon_as_the_last_session_does():
    server = start_server({**QUIET, "OPENREALTIME_DRAIN_GRACE_S": "60"}, name="drain-early")
    try:
        ws = await open_ws(server)
        server.proc.send_signal(signal.SIGTERM)
        await wait_draining(server)
        await asyncio.sleep(0.5)
        assert server.proc.poll() is None  # waiting for the session
        await ws.close()
        ended = time.monotonic()
        assert exit_code(server, 20) == 0
        assert time.monotonic() - ended < 10  # not the 60 s grace
    finally:
        stop_server(server)
    assert_clean_log(server)
    assert "Drained: every session ended" in server.log_text()


async def test_a_second_sigterm_closes_the_sessions_at_once():
    server = start_server({**QUIET, "OPENREALTIME_DRAIN_GRACE_S": "60"}, name="drain-twice")
    try:
        ws = await open_ws(server)
        server.proc.send_signal(signal.SIGTERM)
        await wait_draining(server)
        server.proc.send_signal(signal.SIGTERM)
        again = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code == 1001
        assert exit_code(server, 20) == 0
        assert time.monotonic() - again < 10
    finally:
        stop_server(server)
    assert_clean_log(server)
    assert "closing the sessions now" in server.log_text()
