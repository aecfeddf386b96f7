"""Bad input on every REST route of the real server: a 4xx in the OpenAI error shape, never a 5xx.

Each case is one request a client (or an attacker) can send, then a check that the server still
answers normally. The named regression cases are those of issue 10: bodies nested 5000 deep (JSON
and multipart `session`), WAV headers claiming 0 Hz / 1 Hz, a silent FLAC longer than the duration
cap, `language=xx-garbage`, `tool_calls: 5`, an SDP offer with a garbage fingerprint, and the API
docs served without a key.

A misbehaving third party is simulated by a tiny OpenAI-compatible upstream on loopback (a fake is
the point here: no real server sends `choices: 7`), configured as provider `bad`. Its wrong-shape
chunks must reach clients as upstream faults: a 502 `upstream_error` on /v1/chat/completions, a
failed `response.done` with code `upstream_error` in a Realtime session, which then goes on.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import av
import httpx
import numpy as np
import pytest

from openrealtime.api.app import create_app
from openrealtime.config import Settings

from .conftest import Server, client, collect, start_server, stop_server
from .webrtc_client import Peer

pytestmark = pytest.mark.e2e

DEEP = "[" * 5000 + "]" * 5000  # issue 10: nested 5000 deep
NOT_SO_DEEP = "[" * 150 + "]" * 150  # parses with json.loads, still over the limit of 100

# ------------------------------------------------------------------ a misbehaving upstream

_GOOD = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
]
_TEXT = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
# Wrong-shape chunks seen from real third-party servers' bugs (issue 10).
BROKEN = {
    "delta-oops": json.dumps({"choices": [{"index": 0, "delta": "oops"}]}),
    "usage-abc": json.dumps({"choices": [], "usage": {"prompt_tokens": "abc", "completion_tokens": 1}}),
    "toolcalls-42": json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [42]}}]}),
    "choices-7": json.dumps({"choices": 7}),
    "deep": '{"choices": ' + DEEP + "}",
}


def _script(model: str) -> list[str]:
    """The SSE data payloads the fake upstream sends for a model name.

    ``good``: a normal completion; ``<broken>``: that chunk first; ``late-<broken>``: some text,
    then that chunk (the failure comes after the first event).
    """
    if model == "good":
        return [json.dumps(c) for c in _GOOD]
    late = model.startswith("late-")
    broken = BROKEN[model.removeprefix("late-")]
    return [json.dumps(_TEXT), broken, *[json.dumps(c) for c in _GOOD[1:]]] if late else [broken]


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[str]

    def do_POST(self) -> None:  # the http.server API names it so
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        model = json.loads(raw or b"{}").get("model", "")
        self.server.requests.append(model)  # type: ignore[attr-defined]
        if self.path != "/v1/chat/completions" or not (model == "good" or model.removeprefix("late-") in BROKEN):
            body = json.dumps({"error": {"message": f"no such model {model}", "type": "invalid_request_error"}})
            self._send(404, "application/json", body.encode())
            return
        payload = "".join(f"data: {chunk}\n\n" for chunk in _script(model)) + "data: [DONE]\n\n"
        self._send(200, "text/event-stream", payload.encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class FakeUpstream:
    httpd: ThreadingHTTPServer

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
    httpd.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield FakeUpstream(httpd)
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def srv(upstream: FakeUpstream) -> Iterator[Server]:
    providers = {"bad": {"base_url": upstream.base_url, "models": ["good"], "connect_retries": 0,
                         "timeout_s": 15}}
    server = start_server({"OPENREALTIME_PROVIDERS": json.dumps(providers)}, name="bad-input")
    yield server
    stop_server(server)
    # No bad input may reach a traceback (the catch-all handler logs one for every 500).
    text = server.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Task was destroyed" not in text, text[-4000:]


@pytest.fixture(scope="module")
async def offer() -> str:
    """A real aiortc SDP offer (audio + data channel)."""
    peer = Peer()
    sdp = await peer.offer()
    await peer.close()
    return sdp


def http(server: Server, key: str | None = "") -> httpx.AsyncClient:
    headers = {} if key is None else {"Authorization": f"Bearer {key or server.api_key}"}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60)


# ------------------------------------------------------------------ checks


def assert_openai_error(response: httpx.Response, status: int | None = None, code: str | None = None,
                        param: Any = ...) -> dict[str, Any]:
    """A 4xx (or exactly ``status``) whose body is ``{"error": {type, code, message, param}}``."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if status is not None:
        assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    assert 400 <= response.status_code < 500, response.text[:500]
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert {"type", "code", "message", "param"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


async def assert_alive(server: Server) -> None:
    """The server still answers a normal request (and its process is still running)."""
    assert server.proc.poll() is None, server.log_text()[-4000:]
    async with http(server) as h:
        response = await h.get("/v1/models")
    assert response.status_code == 200 and response.json()["object"] == "list", response.text


def wav(rate: int, channels: int = 1, frames: bytes = b"\0\0" * 160, bits: int = 16) -> bytes:
    """A PCM WAV file whose header says whatever it is told (rate 0, 1 Hz, 0 channels, ...)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(frames)) + frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


def silent_flac(seconds: float, rate: int = 16000) -> bytes:
    """Silence as FLAC: compresses to almost nothing, however long it is."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        block = np.zeros((1, rate * 10), dtype=np.int16)
        for i in range(int(seconds // 10)):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = i * block.shape[1]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def garbage_fingerprint(sdp: str) -> str:
    out, n = re.subn(r"^a=fingerprint:(\S+) \S+", r"a=fingerprint:\1 garbage", sdp, flags=re.M)
    assert n, sdp
    return out


# ------------------------------------------------------------------ the cases

ONE_SECOND_WAV = wav(16000, frames=b"\0\0" * 16000)


@dataclass
class Case:
    """One bad request: ``route`` is the route template it exercises, ``request`` its httpx kwargs."""

    name: str
    method: str
    route: str
    request: Callable[[str], dict[str, Any]] | dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    code: str | None = None
    path: str | None = None  # the URL when it differs from the route template
    key: str | None = ""  # "" = the server's key, None = no Authorization header
    needs_tts: bool = False

    def kwargs(self, offer: str) -> dict[str, Any]:
        return self.request(offer) if callable(self.request) else dict(self.request)


def _json(text: str) -> dict[str, Any]:
    return {"content": text, "headers": {"Content-Type": "application/json"}}


def _chat(**body: Any) -> dict[str, Any]:
    return {"json": {"model": "smollm2-135m", "max_tokens": 2, **body}}


_USER = [{"role": "user", "content": "Hi"}]
_SDP = {"Content-Type": "application/sdp"}

CASES: list[Case] = [
    # --- /v1/realtime/calls: JSON, application/sdp and multipart dialects
    Case("calls_json_deep_5000", "POST", "/v1/realtime/calls", lambda o: _json(json.dumps({"sdp": o})[:-1]
         + ', "session": ' + DEEP + "}"), 400, "nesting_too_deep"),
    Case("calls_json_body_deep_5000", "POST", "/v1/realtime/calls", _json(DEEP), 400, "nesting_too_deep"),
    Case("calls_json_session_150_deep", "POST", "/v1/realtime/calls", lambda o: _json(json.dumps({"sdp": o})[:-1]
         + ', "session": {"type": "realtime", "x": ' + NOT_SO_DEEP + "}}"), 400, "nesting_too_deep"),
    Case("calls_json_invalid", "POST", "/v1/realtime/calls", _json("{oops"), 400, "invalid_json"),
    Case("calls_json_not_object", "POST", "/v1/realtime/calls", _json("[1, 2]"), 400, "invalid_type"),
    Case("calls_json_sdp_not_string", "POST", "/v1/realtime/calls", {"json": {"sdp": 5}}, 400, "invalid_type"),
    Case("calls_json_session_not_object", "POST", "/v1/realtime/calls", lambda o: {"json": {"sdp": o, "session": 5}},
         400, "invalid_type"),
    Case("calls_json_garbage_fingerprint", "POST", "/v1/realtime/calls",
         lambda o: {"json": {"sdp": garbage_fingerprint(o)}}, 400, "invalid_offer"),
    Case("calls_sdp_garbage_fingerprint", "POST", "/v1/realtime/calls",
         lambda o: {"content": garbage_fingerprint(o), "headers": _SDP}, 400, "invalid_offer"),
    Case("calls_sdp_fingerprint_wrong_length", "POST", "/v1/realtime/calls",
         lambda o: {"content": re.sub(r"^a=fingerprint:\S+ \S+", "a=fingerprint:sha-256 AB:CD", o, flags=re.M),
                    "headers": _SDP}, 400, "invalid_offer"),
    Case("calls_sdp_unknown_fingerprint_algorithm", "POST", "/v1/realtime/calls",
         lambda o: {"content": re.sub(r"^a=fingerprint:\S+ ", "a=fingerprint:md5 ", o, flags=re.M),
                    "headers": _SDP}, 400, "invalid_offer"),
    Case("calls_sdp_not_sdp", "POST", "/v1/realtime/calls", {"content": "hello", "headers": _SDP}, 400,
         "invalid_offer"),
    Case("calls_sdp_not_utf8", "POST", "/v1/realtime/calls", {"content": b"v=0\r\n\xff\xfe", "headers": _SDP}, 400,
         "invalid_offer"),
    Case("calls_multipart_session_deep_5000", "POST", "/v1/realtime/calls",
         lambda o: {"files": {"sdp": (None, o), "session": (None, DEEP)}}, 400, "nesting_too_deep"),
    Case("calls_multipart_session_invalid", "POST", "/v1/realtime/calls",
         lambda o: {"files": {"sdp": (None, o), "session": (None, "{not json")}}, 400, "invalid_json"),
    Case("calls_multipart_no_sdp", "POST", "/v1/realtime/calls", {"files": {"session": (None, "{}")}}, 400,
         "missing_required_parameter"),
    Case("calls_multipart_malformed", "POST", "/v1/realtime/calls",
         {"content": b"--x\r\nContent-Disposition: form-data\r\n\r\nno end",
          "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400),
    Case("calls_unsupported_content_type", "POST", "/v1/realtime/calls",
         {"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, 415),
    Case("calls_too_large", "POST", "/v1/realtime/calls", {"content": "v=0\r\n" + "a=x\r\n" * 400_000,
                                                           "headers": _SDP}, 413),
    Case("calls_no_key", "POST", "/v1/realtime/calls", lambda o: {"content": o, "headers": _SDP}, 401, key=None),
    # --- hangup
    Case("hangup_unknown_call", "POST", "/v1/realtime/calls/{call_id}/hangup", {}, 404, "call_not_found",
         path="/v1/realtime/calls/rtc_nope/hangup"),
    Case("hangup_odd_id", "POST", "/v1/realtime/calls/{call_id}/hangup", {}, 404, "call_not_found",
         path="/v1/realtime/calls/%00%FF" + "x" * 5000 + "/hangup"),
    Case("hangup_wrong_method", "GET", "/v1/realtime/calls/{call_id}/hangup", {}, 405,
         path="/v1/realtime/calls/rtc_nope/hangup"),
    Case("hangup_no_key", "POST", "/v1/realtime/calls/{call_id}/hangup", {}, 401,
         path="/v1/realtime/calls/rtc_nope/hangup", key=None),
    # --- ice servers
    Case("ice_servers_wrong_method", "POST", "/v1/realtime/ice-servers", {}, 405),
    Case("ice_servers_no_key", "GET", "/v1/realtime/ice-servers", {}, 401, key=None),
    # --- client secrets
    Case("client_secrets_json_deep_5000", "POST", "/v1/realtime/client_secrets",
         _json('{"session": ' + DEEP + "}"), 400, "nesting_too_deep"),
    Case("client_secrets_json_150_deep", "POST", "/v1/realtime/client_secrets",
         _json('{"session": {"type": "realtime", "x": ' + NOT_SO_DEEP + "}}"), 400, "nesting_too_deep"),
    Case("client_secrets_multipart_deep_5000", "POST", "/v1/realtime/client_secrets",
         {"files": {"session": (None, DEEP)}}, 400),
    Case("client_secrets_deep_5000_as_form_type", "POST", "/v1/realtime/client_secrets",
         {"content": DEEP, "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400),
    Case("client_secrets_invalid_json", "POST", "/v1/realtime/client_secrets", _json("{"), 400, "invalid_json"),
    Case("client_secrets_not_object", "POST", "/v1/realtime/client_secrets", _json('"x"'), 400, "invalid_type"),
    Case("client_secrets_unknown_field", "POST", "/v1/realtime/client_secrets", {"json": {"nope": 1}}, 400,
         "unknown_parameter"),
    Case("client_secrets_ttl_too_long", "POST", "/v1/realtime/client_secrets",
         {"json": {"expires_after": {"anchor": "created_at", "seconds": 10**40}}}, 400, "value_above_max"),
    Case("client_secrets_bad_session", "POST", "/v1/realtime/client_secrets",
         {"json": {"session": {"type": "realtime", "tools": 5}}}, 400),
    Case("client_secrets_too_large", "POST", "/v1/realtime/client_secrets",
         _json('{"session": {"instructions": "' + "x" * (2 * 1024 * 1024) + '"}}'), 413),
    # --- /v1/audio/transcriptions
    Case("transcriptions_wav_rate_0", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", wav(0))}}, 400, "invalid_audio"),
    Case("transcriptions_wav_claiming_1hz", "POST", "/v1/audio/transcriptions",  # 400 bytes = 178 s at 1 Hz
         {"files": {"file": ("a.wav", wav(1, frames=b"\0\0" * 178))}}, 400, "invalid_audio"),
    Case("transcriptions_wav_rate_too_high", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", wav(1_000_000))}}, 400, "invalid_audio"),
    Case("transcriptions_wav_zero_channels", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", wav(16000, channels=0))}}, 400, "invalid_audio"),
    Case("transcriptions_wav_65535_channels", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", wav(16000, channels=65535, frames=b"\0" * 65535 * 2))}}, 400, "invalid_audio"),
    Case("transcriptions_silent_flac_over_the_cap", "POST", "/v1/audio/transcriptions",  # 10 min 30 s > 600 s
         lambda _: {"files": {"file": ("silence.flac", silent_flac(630))}}, 400, "audio_too_long"),
    Case("transcriptions_language_xx_garbage", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", ONE_SECOND_WAV)}, "data": {"language": "xx-garbage"}}, 400,
         "unsupported_language"),
    Case("transcriptions_not_audio", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.mp3", b"garbage" * 100)}}, 400, "invalid_audio"),
    Case("transcriptions_empty_file", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", b"")}}, 400, "invalid_audio"),
    Case("transcriptions_odd_raw_pcm", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.raw", b"abc")}}, 400, "invalid_audio"),
    Case("transcriptions_file_as_text_field", "POST", "/v1/audio/transcriptions",
         {"files": {"file": (None, "abc")}}, 400),
    Case("transcriptions_missing_file", "POST", "/v1/audio/transcriptions", {"data": {"model": "whisper-1"}}, 400),
    Case("transcriptions_json_deep_5000", "POST", "/v1/audio/transcriptions", _json(DEEP), 400),
    Case("transcriptions_bad_response_format", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", ONE_SECOND_WAV)}, "data": {"response_format": "xml"}}, 400, "unsupported_value"),
    Case("transcriptions_bad_temperature", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", ONE_SECOND_WAV)}, "data": {"temperature": "abc"}}, 400),
    Case("transcriptions_too_large", "POST", "/v1/audio/transcriptions",
         {"files": {"file": ("a.wav", b"\0" * (25 * 1024 * 1024 + 10))}}, 413, "file_too_large"),
    # --- /v1/audio/speech
    Case("speech_json_deep_5000", "POST", "/v1/audio/speech", _json('{"input": "hi", "voice": ' + DEEP + "}"),
         400, "nesting_too_deep"),
    Case("speech_invalid_json", "POST", "/v1/audio/speech", _json('{"input": '), 400, "invalid_json"),
    Case("speech_missing_input", "POST", "/v1/audio/speech", {"json": {"voice": "alloy"}}, 400),
    Case("speech_input_too_long", "POST", "/v1/audio/speech", {"json": {"input": "a" * 5000, "voice": "alloy"}}, 400),
    Case("speech_bad_speed", "POST", "/v1/audio/speech", {"json": {"input": "hi", "voice": "alloy", "speed": 99}},
         400),
    Case("speech_bad_format", "POST", "/v1/audio/speech",
         {"json": {"input": "hi", "voice": "alloy", "response_format": "xm"}}, 400),
    Case("speech_unknown_voice", "POST", "/v1/audio/speech", {"json": {"input": "hi", "voice": "../../x"}}, 400,
         "invalid_value", needs_tts=True),
    Case("speech_voice_object_of_garbage", "POST", "/v1/audio/speech",
         {"json": {"input": "hi", "voice": {"id": {"a": [1]}}}}, 400, needs_tts=True),
    Case("speech_nothing_to_say", "POST", "/v1/audio/speech", {"json": {"input": "***", "voice": "alloy"}}, 400,
         needs_tts=True),
    # --- /v1/chat/completions
    Case("chat_assistant_tool_calls_5", "POST", "/v1/chat/completions",
         _chat(messages=[{"role": "assistant", "content": "x", "tool_calls": 5}, *_USER]), 400, "invalid_type"),
    Case("chat_tool_call_not_object", "POST", "/v1/chat/completions",
         _chat(messages=[{"role": "assistant", "content": "x", "tool_calls": [5]}, *_USER]), 400),
    Case("chat_json_deep_5000", "POST", "/v1/chat/completions",
         _json('{"messages": [{"role": "user", "content": ' + DEEP + "}]}"), 400, "nesting_too_deep"),
    Case("chat_json_150_deep", "POST", "/v1/chat/completions",
         _json('{"messages": [{"role": "user", "content": "hi", "x": ' + NOT_SO_DEEP + "}]}"), 400,
         "nesting_too_deep"),
    Case("chat_deep_without_content_type", "POST", "/v1/chat/completions", {"content": '{"messages": ' + DEEP + "}"},
         400),
    Case("chat_deep_as_text_plain", "POST", "/v1/chat/completions",
         {"content": '{"messages": ' + DEEP + "}", "headers": {"Content-Type": "text/plain"}}, 400),
    Case("chat_deep_as_vendor_json", "POST", "/v1/chat/completions",
         {"content": '{"messages": ' + DEEP + "}", "headers": {"Content-Type": "application/vnd.x+json"}}, 400,
         "nesting_too_deep"),
    Case("chat_invalid_json", "POST", "/v1/chat/completions", _json('{"messages": ['), 400),
    Case("chat_not_utf8", "POST", "/v1/chat/completions", {"content": b'{"messages": "\xff"}',
                                                           "headers": {"Content-Type": "application/json"}}, 400),
    Case("chat_no_messages", "POST", "/v1/chat/completions", _chat(messages=[]), 400),
    Case("chat_messages_not_objects", "POST", "/v1/chat/completions", _chat(messages=[5]), 400),
    Case("chat_bad_role", "POST", "/v1/chat/completions", _chat(messages=[{"role": ["user"], "content": "x"}]), 400),
    Case("chat_image_part", "POST", "/v1/chat/completions",
         _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
         "unsupported_content"),
    Case("chat_tool_message_without_id", "POST", "/v1/chat/completions",
         _chat(messages=[{"role": "tool", "content": "x"}]), 400, "missing_required_parameter"),
    Case("chat_tool_choice_function_not_object", "POST", "/v1/chat/completions",
         _chat(messages=_USER, tool_choice={"type": "function", "function": "f"}), 400),
    Case("chat_tool_parameters_not_object", "POST", "/v1/chat/completions",
         _chat(messages=_USER, tools=[{"type": "function", "function": {"name": "f", "parameters": 5}}]), 400),
    Case("chat_tool_description_not_string", "POST", "/v1/chat/completions",
         _chat(messages=_USER, tools=[{"type": "function", "function": {"name": "f", "description": [1]}}]), 400),
    Case("chat_required_without_tools", "POST", "/v1/chat/completions", _chat(messages=_USER, tool_choice="required"),
         400),
    Case("chat_seed_beyond_int64", "POST", "/v1/chat/completions", _chat(messages=_USER, seed=2**70), 400),
    Case("chat_n_2", "POST", "/v1/chat/completions", _chat(messages=_USER, n=2), 400, "unsupported_value"),
    Case("chat_temperature_9", "POST", "/v1/chat/completions", _chat(messages=_USER, temperature=9), 400),
    Case("chat_json_response_format", "POST", "/v1/chat/completions",
         _chat(messages=_USER, response_format={"type": "json_object"}), 400, "unsupported_value"),
    Case("chat_context_too_long", "POST", "/v1/chat/completions",
         _chat(messages=[{"role": "user", "content": "word " * 40_000}]), 400, "context_length_exceeded"),
    Case("chat_model_not_a_string", "POST", "/v1/chat/completions", _chat(model={"a": 1}, messages=_USER), 400),
    Case("chat_form_body", "POST", "/v1/chat/completions", {"data": {"messages": "x"}}, 400),
    # --- GET routes and the rest: wrong method, no key, bad paths
    Case("models_wrong_method", "POST", "/v1/models", {}, 405),
    Case("models_no_key", "GET", "/v1/models", {}, 401, key=None),
    Case("models_wrong_key", "GET", "/v1/models", {}, 401, key="sk-wrong"),
    Case("voices_wrong_method", "DELETE", "/v1/voices", {}, 405),
    Case("voices_no_key", "GET", "/v1/voices", {}, 401, key=None),
    Case("metrics_no_key", "GET", "/metrics", {}, 401, key=None),
    Case("metrics_wrong_method", "POST", "/metrics", {}, 405),
    Case("healthz_wrong_method", "POST", "/healthz", {}, 405),
    Case("readyz_wrong_method", "POST", "/readyz", {}, 405),
    Case("readyz_with_a_body_and_query", "PUT", "/readyz", {"content": DEEP, "params": {"x": "\x00" * 100}}, 405),
    Case("playground_page_wrong_method", "POST", "/", {}, 405),
    Case("playground_config_wrong_method", "POST", "/playground/config", {}, 405),
    Case("playground_session_deep_5000", "POST", "/playground/session", _json(DEEP), 400),
    Case("playground_session_invalid_json", "POST", "/playground/session", _json("{"), 400),
    Case("playground_static_traversal", "GET", "/playground/static", {}, 404,
         path="/playground/static/..%2f..%2f..%2fpyproject.toml"),
    Case("docs_not_served", "GET", "/docs", {}, 404, key=None),
    Case("redoc_not_served", "GET", "/redoc", {}, 404, key=None),
    Case("openapi_not_served", "GET", "/openapi.json", {}, 404),
    Case("unknown_route", "GET", "/v1/nope", {}, 404),
]


@pytest.fixture(scope="module")
async def has_tts(srv: Server) -> bool:
    async with http(srv) as h:
        return bool((await h.get("/v1/voices")).json()["data"])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_request_is_a_4xx_in_the_openai_shape(srv: Server, offer: str, has_tts: bool, case: Case):
    if case.needs_tts and not has_tts:
        pytest.skip("the server has no speech synthesis")
    async with http(srv, key=case.key) as h:
        response = await h.request(case.method, case.path or case.route, **case.kwargs(offer))
    assert_openai_error(response, case.status, case.code)
    await assert_alive(srv)


def _rest_routes(routes: list[Any]) -> set[tuple[str, str]]:
    """(method, path) of every HTTP route, included routers and mounts too; WebSockets left out."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's lazily included routers
        if included is not None:
            found |= _rest_routes(included.routes)
        elif getattr(route, "methods", None):
            found |= {(m, route.path) for m in route.methods if m != "HEAD"}
        elif type(route).__name__ == "Mount":
            found.add(("GET", route.path))
    return found


def test_every_rest_route_has_bad_input_cases():
    """A new route without cases here fails: the list above must keep covering the whole API."""
    settings = Settings(llm_model="smollm2-135m", stt_enabled=False, tts_enabled=False, vad_enabled=False,
                        turn_detector_enabled=False, noise_suppressor="off", api_docs=False)
    routes = _rest_routes(create_app(settings).routes)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/models") in routes
    covered = {(c.method, c.route) for c in CASES}
    missing = {r for r in routes if r not in covered and not any(c.route == r[1] for c in CASES)}
    assert not missing, f"routes without bad-input cases: {sorted(missing)}"


# ------------------------------------------------------------------ normal requests still work


async def test_each_route_still_serves_a_normal_request(srv: Server, offer: str, has_tts: bool):
    async with http(srv) as h:
        response = await h.post("/v1/chat/completions", json=_chat(messages=_USER, seed=-1)["json"])
        assert response.status_code == 200, response.text  # a negative seed is a valid int64
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
        response = await h.post("/v1/audio/transcriptions", files={"file": ("a.wav", ONE_SECOND_WAV)},
                                data={"language": "en"})
        assert response.status_code == 200 and isinstance(response.json()["text"], str), response.text
        response = await h.post("/v1/realtime/client_secrets", json={})
        assert response.status_code == 200 and response.json()["value"].startswith("ek_"), response.text
        response = await h.post("/v1/realtime/calls", content=offer, headers=_SDP)
        assert response.status_code == 201, response.text
        call_id = response.headers["location"].rsplit("/", 1)[-1]
        assert (await h.post(f"/v1/realtime/calls/{call_id}/hangup")).status_code == 200
        assert (await h.get("/v1/realtime/ice-servers")).status_code == 200
        assert (await h.get("/healthz")).status_code == 200
        assert (await h.get("/readyz")).json() == {"status": "ready"}  # --preload: loaded before listening
        if has_tts:
            response = await h.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy",
                                                               "response_format": "pcm"})
            assert response.status_code == 200 and len(response.content) > 0


async def test_silent_flac_over_the_cap_is_refused_without_decoding_it_all(srv: Server):
    data = silent_flac(7200)  # two hours, ~1.3 MB: decoding it all would take seconds
    async with http(srv) as h:
        start = time.monotonic()
        response = await h.post("/v1/audio/transcriptions", files={"file": ("long.flac", data)})
        took = time.monotonic() - start
    assert_openai_error(response, 400, "audio_too_long", "file")
    assert took < 20, took  # the old path decoded everything, then ran speech to text on it
    await assert_alive(srv)


async def test_api_docs_only_when_enabled():
    docs = start_server({"OPENREALTIME_API_DOCS": "true", "OPENREALTIME_STT_ENABLED": "false",
                         "OPENREALTIME_TTS_ENABLED": "false", "OPENREALTIME_VAD_ENABLED": "false",
                         "OPENREALTIME_TURN_DETECTOR_ENABLED": "false", "OPENREALTIME_NOISE_SUPPRESSOR": "off"},
                        name="api-docs")
    try:
        async with httpx.AsyncClient(base_url=docs.base_url, timeout=30) as h:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert (await h.get(path)).status_code == 200, path
            assert "/v1/chat/completions" in (await h.get("/openapi.json")).json()["paths"]
    finally:
        stop_server(docs)


# ------------------------------------------------------------------ a misbehaving upstream

BROKEN_MODELS = sorted(BROKEN)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("model", BROKEN_MODELS)
async def test_wrong_shape_upstream_chunk_is_a_502_upstream_error(srv: Server, upstream: FakeUpstream,
                                                                 model: str, stream: bool):
    before = len(upstream.requests)
    async with http(srv) as h:
        response = await h.post("/v1/chat/completions", json={"model": f"bad/{model}", "messages": _USER,
                                                              "stream": stream})
    assert len(upstream.requests) > before, "the request never reached the upstream"
    assert response.status_code == 502, response.text[:500]
    error = response.json()["error"]
    assert {"type", "code", "message", "param"} <= set(error) and error["message"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error", error
    await assert_alive(srv)


@pytest.mark.parametrize("model", BROKEN_MODELS)
async def test_wrong_shape_chunk_after_text(srv: Server, model: str):
    async with http(srv) as h:
        response = await h.post("/v1/chat/completions", json={"model": f"bad/late-{model}", "messages": _USER})
        assert response.status_code == 502, response.text[:500]
        assert response.json()["error"]["code"] == "upstream_error"
        # Streaming: the headers are sent with the first text, so the failure comes as an error event.
        response = await h.post("/v1/chat/completions", json={"model": f"bad/late-{model}", "messages": _USER,
                                                              "stream": True})
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "upstream_error", events[-1]
        assert "data: [DONE]" not in response.text
        # A well-behaved completion through the same provider still works.
        response = await h.post("/v1/chat/completions", json={"model": "bad/good", "messages": _USER})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Hello there"


async def _turn(conn: Any, text: str) -> dict[str, Any]:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    await conn.response.create()
    return (await collect(conn, "response.done", timeout=60))[-1]["response"]


async def _use_model(conn: Any, model: str) -> None:
    await conn.session.update(session={"type": "realtime", "model": model, "output_modalities": ["text"]})
    await collect(conn, "session.updated")


@pytest.mark.parametrize("model", [*BROKEN_MODELS, *(f"late-{m}" for m in BROKEN_MODELS)])
async def test_wrong_shape_upstream_in_a_realtime_session(srv: Server, model: str):
    async with client(srv).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await _use_model(conn, f"bad/{model}")
        response = await _turn(conn, "Hi")
        assert response["status"] == "failed", response
        error = response["status_details"]["error"]
        assert error["code"] == "upstream_error", error  # not server_error: the upstream is at fault
        # The session goes on: the next turn, on a well-behaved model, completes.
        await _use_model(conn, "bad/good")
        response = await _turn(conn, "Hi again")
        assert response["status"] == "completed", response["status_details"]
        texts = [c.get("text") for o in response["output"] for c in o.get("content", [])]
        assert "Hello there" in texts, response["output"]
    await assert_alive(srv)


async def test_no_request_ended_in_a_server_error(srv: Server):
    """Belt and braces over the log: the catch-all handler logs every 500 it answers."""
    await asyncio.sleep(0.2)
    text = srv.log_text()
    assert " 500 " not in text and "unhandled error" not in text, text[-4000:]
