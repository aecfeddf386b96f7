"""WebRTC transport pieces that need no server: ICE servers, offers, candidates, dialects, calls.

The call tests run a real aiortc client against a CallManager on loopback, with a scripted session
standing in for the engine, so transport behaviour is checked independently of the model.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from typing import Any

import av
import numpy as np
import pytest
from aioice import Connection
from aioice.ice import get_host_addresses
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from openrealtime.api.calls import (
    classify_body,
    parse_json_offer,
    parse_sdp_offer,
    parse_session,
    wants_json,
)
from openrealtime.api.errors import APIError
from openrealtime.config import IceConfig, Settings
from openrealtime.engine import EngineContext, InvalidSessionConfig
from openrealtime.transports.webrtc import (
    CallManager,
    HostAddressPlan,
    InvalidOffer,
    ShuttingDown,
    SilenceTrack,
    build_ice_servers,
    parse_offer,
    turn_rest_credentials,
)

# ----------------------------------------------------------------------------- TURN / ICE servers


def _coturn_check(secret: str, username: str, credential: str) -> bool:
    """What coturn does in use-auth-secret mode, written independently of the server code."""
    expected = base64.b64encode(hmac.new(secret.encode(), username.encode(), "sha1").digest()).decode()
    expiry = int(username.split(":", 1)[0])
    return hmac.compare_digest(expected, credential) and expiry > time.time()


def test_turn_rest_credentials_verify_like_coturn() -> None:
    before = int(time.time())
    username, credential = turn_rest_credentials("s3cret", 600)
    expiry, _, user_id = username.partition(":")
    assert before + 600 <= int(expiry) <= int(time.time()) + 600
    assert re.fullmatch(r"[0-9a-f-]{36}", user_id)
    assert _coturn_check("s3cret", username, credential)
    assert not _coturn_check("other", username, credential)
    # Fixed inputs give the RFC-style digest computed by hand.
    username, credential = turn_rest_credentials("k", 10, now=1000, user_id="alice")
    assert username == "1010:alice"
    assert credential == base64.b64encode(hmac.new(b"k", b"1010:alice", hashlib.sha1).digest()).decode()


def test_turn_credentials_are_fresh_per_request() -> None:
    assert turn_rest_credentials("k", 60)[0] != turn_rest_credentials("k", 60)[0]


def test_expired_credentials_fail_the_check() -> None:
    username, credential = turn_rest_credentials("k", 60, now=time.time() - 120)
    assert not _coturn_check("k", username, credential)


def test_ice_servers_shape() -> None:
    assert build_ice_servers(IceConfig()) == []
    ice = IceConfig(stun_urls=["stun:stun.example.org:3478"],
                    turn_urls=["turn:turn.example.org:3478", "turn:turn.example.org:3478?transport=tcp"],
                    turn_secret="shared", turn_ttl_s=3600)
    stun, turn = build_ice_servers(ice)
    assert stun == {"urls": ["stun:stun.example.org:3478"]}
    assert set(turn) == {"urls", "username", "credential"}
    assert turn["urls"] == ice.turn_urls
    assert _coturn_check("shared", turn["username"], turn["credential"])
    assert int(turn["username"].split(":")[0]) >= time.time() + 3590


def test_turn_without_secret_is_not_offered() -> None:
    # Browsers throw on a turn: URL without credentials, so a bare entry would break clients.
    ice = IceConfig(stun_urls=["stun:a:1"], turn_urls=["turn:b:2"])
    assert build_ice_servers(ice) == [{"urls": ["stun:a:1"]}]


def test_manager_ice_servers_use_settings() -> None:
    settings = Settings(ice=IceConfig(turn_urls=["turn:t:3478"], turn_secret="x", addresses=["127.0.0.1"]))
    manager = CallManager(settings, _ctx())
    [turn] = manager.ice_servers()
    assert _coturn_check("x", turn["username"], turn["credential"])


# ----------------------------------------------------------------------------- offers


def _stock_client_fallback(pc: RTCPeerConnection) -> None:
    """On a host with only loopback (a network-less container) stock aiortc gathers nothing."""
    if not get_host_addresses(use_ipv4=True, use_ipv6=True):
        HostAddressPlan(["127.0.0.1"], gather_interfaces=False).apply(pc)


async def _client(audio: bool = True, channel: bool = True) -> RTCPeerConnection:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: loopback only
    if audio:
        pc.addTrack(AudioStreamTrack())
    if channel:
        pc.createDataChannel("oai-events")
    _stock_client_fallback(pc)
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def test_parse_offer_accepts_a_real_offer() -> None:
    pc = await _client()
    try:
        desc = parse_offer(pc.localDescription.sdp)
        assert [m.kind for m in desc.media] == ["audio", "application"]
        parse_offer(pc.localDescription.sdp.replace("\r\n", "\n"))  # bare LF is tolerated
    finally:
        await pc.close()


async def test_parse_offer_rejects_bad_sdp() -> None:
    pc = await _client()
    offer = pc.localDescription.sdp
    await pc.close()
    without = lambda prefix: "\r\n".join(x for x in offer.split("\r\n") if not x.startswith(prefix))  # noqa: E731
    bad = {
        "empty": "",
        "text": "hello world",
        "json": '{"sdp": "v=0"}',
        "session only": offer.split("m=")[0],
        "no ice": without("a=ice-ufrag"),
        "no fingerprint": without("a=fingerprint"),
        "bad m-line": offer.replace("m=audio ", "m=audio x"),
        "huge": offer + "a=x:" + "y" * 300_000,
    }
    for name, sdp in bad.items():
        with pytest.raises(InvalidOffer):
            parse_offer(sdp)
        assert issubclass(InvalidOffer, ValueError), name


# ----------------------------------------------------------------------------- host candidates


def test_address_plan_classifies_addresses() -> None:
    plan = HostAddressPlan(["127.0.0.1", "203.0.113.7", "127.0.0.1"], gather_interfaces=False)
    assert plan.local == ["127.0.0.1"]
    assert plan.mapped == ["203.0.113.7"]  # TEST-NET-3: never assigned here, so 1:1 NAT mapped
    for bad in (["example.com"], ["0.0.0.0"]):
        with pytest.raises(ValueError):
            HostAddressPlan(bad, gather_interfaces=True)
    with pytest.raises(ValueError):
        HostAddressPlan([], gather_interfaces=False)


async def test_address_plan_makes_aioice_offer_loopback_and_mapped_addresses() -> None:
    conn = Connection(ice_controlling=False, use_ipv6=False)
    HostAddressPlan(["127.0.0.1", "203.0.113.7"], gather_interfaces=False).install(conn)
    try:
        await conn.gather_candidates()
        hosts = sorted(c.host for c in conn.local_candidates)
        assert hosts == ["127.0.0.1", "203.0.113.7"]
        assert all(c.type == "host" for c in conn.local_candidates)
        mapped = next(c for c in conn.local_candidates if c.host == "203.0.113.7")
        [sock] = [p.transport.get_extra_info("sockname") for p in conn._protocols
                  if p.local_candidate is mapped]
        assert sock == ("0.0.0.0", mapped.port)  # the socket that receives the NAT'd traffic
    finally:
        await conn.close()


async def test_address_plan_can_add_interface_gathering() -> None:
    plain = Connection(ice_controlling=False, use_ipv6=False)
    await plain.gather_candidates()
    conn = Connection(ice_controlling=False, use_ipv6=False)
    HostAddressPlan(["127.0.0.1"], gather_interfaces=True).install(conn)
    try:
        await conn.gather_candidates()
        hosts = {c.host for c in conn.local_candidates}
        assert hosts == {"127.0.0.1"} | {c.host for c in plain.local_candidates}
    finally:
        await plain.close()
        await conn.close()


# ----------------------------------------------------------------------------- outgoing audio


async def test_silence_track_is_paced_20ms_frames() -> None:
    track = SilenceTrack()
    start = time.monotonic()
    frames = [await track.recv() for _ in range(6)]
    elapsed = time.monotonic() - start
    assert [f.pts for f in frames] == [i * 960 for i in range(6)]
    assert all(f.samples == 960 and f.sample_rate == 48000 for f in frames)
    assert bytes(frames[0].planes[0])[:1920] == bytes(1920)
    assert 0.09 <= elapsed < 0.3  # five 20 ms waits after the first frame
    track.stop()


# ----------------------------------------------------------------------------- HTTP dialects


def test_classify_body() -> None:
    sdp = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"
    assert classify_body("application/json", b"{}") == "json"
    assert classify_body("application/json; charset=utf-8", b"{}") == "json"
    assert classify_body("application/sdp", sdp) == "sdp"
    assert classify_body("multipart/form-data; boundary=abc", b"--abc") == "form"
    assert classify_body("application/x-www-form-urlencoded", sdp) == "sdp"  # curl -d @offer.sdp
    assert classify_body("application/x-www-form-urlencoded", b"sdp=v%3D0") == "form"
    assert classify_body(None, sdp) == "sdp"
    assert classify_body("text/plain", b'{"sdp": ""}') == "json"
    with pytest.raises(APIError) as err:
        classify_body("image/png", b"\x89PNG")
    assert err.value.status == 415
    with pytest.raises(APIError):
        classify_body(None, b"hello")


def test_wants_json() -> None:
    assert wants_json("json", None)
    assert wants_json("json", "*/*")
    assert not wants_json("json", "application/sdp")  # openai-python's calls.create
    assert not wants_json("sdp", None)
    assert not wants_json("form", "*/*")
    assert wants_json("sdp", "application/json")
    assert not wants_json("form", "application/sdp, application/json")


def test_parse_json_offer() -> None:
    offer = parse_json_offer(json.dumps({"sdp": "v=0", "session": {"model": "m"}}).encode())
    assert (offer.sdp, offer.session, offer.dialect) == ("v=0", {"model": "m"}, "json")
    assert parse_json_offer(b'{"sdp": "v=0", "session": null}').session is None
    cases = {b"{nope": (None, "invalid_json"), b"[1]": (None, "invalid_type"),
             b"{}": ("sdp", "missing_required_parameter"), b'{"sdp": 1}': ("sdp", "invalid_type"),
             b'{"sdp": "v=0", "session": 3}': ("session", "invalid_type")}
    for body, (param, code) in cases.items():
        with pytest.raises(APIError) as err:
            parse_json_offer(body)
        assert (err.value.status, err.value.param, err.value.code) == (400, param, code), body


def test_parse_sdp_offer_and_session_field() -> None:
    assert parse_sdp_offer(b"  v=0\r\n ").sdp == "v=0"
    with pytest.raises(APIError):
        parse_sdp_offer(b"")
    with pytest.raises(APIError):
        parse_sdp_offer(b"\xff\xfe")
    assert parse_session('{"type": "realtime"}') == {"type": "realtime"}
    assert parse_session("") is None and parse_session(None) is None and parse_session("null") is None
    for bad in ("{x", "[]", "3"):
        with pytest.raises(APIError) as err:
            parse_session(bad)
        assert err.value.param == "session"


# ----------------------------------------------------------------------------- calls on loopback


class ScriptedSession:
    """Stands in for RealtimeSession: echoes events, answers bad JSON with an error."""

    instances: list[ScriptedSession] = []

    def __init__(self, ctx: Any, *, transport: str, initial_session: dict | None = None,
                 model: str | None = None):
        if initial_session and "bad" in initial_session:
            raise InvalidSessionConfig("bad field", "session.bad")
        self.outbox: asyncio.Queue[dict | None] = asyncio.Queue()
        self.received: list[str | bytes] = []
        self.closed = False
        ScriptedSession.instances.append(self)

    async def start(self) -> None:
        self.outbox.put_nowait({"type": "session.created"})

    async def handle_text(self, raw: str | bytes) -> None:
        self.received.append(raw)
        try:
            event = json.loads(raw)
        except ValueError:
            self.outbox.put_nowait({"type": "error"})
            return
        self.outbox.put_nowait({"type": "echo", "event": event})

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)


def _ctx() -> EngineContext:
    async def resolve(_: str | None) -> Any:
        raise AssertionError("no model in transport tests")

    return EngineContext(resolve_llm=resolve, default_model="test", default_instructions="")


def _manager(**kw: Any) -> CallManager:
    settings = Settings(ice=IceConfig(addresses=["127.0.0.1"], gather_interfaces=False))
    return CallManager(settings, _ctx(), session_factory=ScriptedSession, **kw)


class Peer:
    """An aiortc client: offer, answer, channel events."""

    def __init__(self, pc: RTCPeerConnection):
        self.pc = pc
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.channel: Any = None
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        pc.on("connectionstatechange",
              lambda: self.closed.set() if pc.connectionState in ("closed", "failed") else None)

    @classmethod
    async def create(cls) -> Peer:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(AudioStreamTrack())
        peer = cls(pc)
        peer.channel = pc.createDataChannel("oai-events")
        peer.channel.on("open", peer.opened.set)
        peer.channel.on("message", lambda m: peer.events.put_nowait(json.loads(m)))
        _stock_client_fallback(pc)
        await pc.setLocalDescription(await pc.createOffer())
        return peer

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def next(self, wait_s: float = 5) -> dict:
        return await asyncio.wait_for(self.events.get(), wait_s)


async def _no_leaks(manager: CallManager) -> None:
    await manager.close()
    assert len(manager) == 0
    stray = [t for t in asyncio.all_tasks() if t.get_name().startswith("rtc_")]
    assert not stray, stray


async def test_call_connects_on_loopback_and_bridges_events() -> None:
    manager = _manager()
    peer = await Peer.create()
    try:
        call = await manager.create_call(peer.pc.localDescription.sdp, {"instructions": "hi"}, None)
        assert call.id.startswith("rtc_") and manager.get(call.id) is call
        assert " 127.0.0.1 " in call.answer_sdp and "a=sendrecv" in call.answer_sdp
        await peer.answer(call.answer_sdp)
        await asyncio.wait_for(peer.opened.wait(), 10)
        assert peer.pc.connectionState == "connected"
        assert (await peer.next())["type"] == "session.created"
        peer.channel.send(json.dumps({"type": "a"}))
        peer.channel.send("not json")
        peer.channel.send(json.dumps({"type": "b"}))
        got = [await peer.next() for _ in range(3)]
        assert got == [{"type": "echo", "event": {"type": "a"}}, {"type": "error"},
                       {"type": "echo", "event": {"type": "b"}}]
        # Our silence track reaches the client as decoded Opus.
        frame = await asyncio.wait_for(peer.pc.getReceivers()[0].track.recv(), 5)
        assert frame.sample_rate == 48000
        assert await manager.hangup(call.id)
        assert manager.get(call.id) is None and not await manager.hangup(call.id)
        assert call.session.closed and call.ended.is_set()
        await asyncio.wait_for(peer.closed.wait(), 10)
    finally:
        await peer.pc.close()
        await _no_leaks(manager)


async def test_events_wait_for_the_channel_and_keep_their_order() -> None:
    manager = _manager()
    peer = await Peer.create()
    try:
        call = await manager.create_call(peer.pc.localDescription.sdp)
        for i in range(5):
            call.session.outbox.put_nowait({"type": "early", "n": i})
        await asyncio.sleep(0.2)  # nothing connected yet: the pump must hold the events
        await peer.answer(call.answer_sdp)
        got = [await peer.next(10) for _ in range(6)]
        assert [e["type"] for e in got] == ["session.created"] + ["early"] * 5
        assert [e["n"] for e in got[1:]] == list(range(5))
    finally:
        await peer.pc.close()
        await _no_leaks(manager)


async def test_client_closing_ends_the_call() -> None:
    manager = _manager()
    peer = await Peer.create()
    call = await manager.create_call(peer.pc.localDescription.sdp)
    await peer.answer(call.answer_sdp)
    await asyncio.wait_for(peer.opened.wait(), 10)
    await peer.pc.close()
    await asyncio.wait_for(call.ended.wait(), 10)
    assert call.end_reason in ("data channel closed", "connection closed", "ICE closed")
    assert manager.get(call.id) is None and call.session.closed
    await _no_leaks(manager)


async def test_session_closing_ends_the_call() -> None:
    manager = _manager()
    peer = await Peer.create()
    try:
        call = await manager.create_call(peer.pc.localDescription.sdp)
        await peer.answer(call.answer_sdp)
        await asyncio.wait_for(peer.opened.wait(), 10)
        await call.session.close()
        await asyncio.wait_for(call.ended.wait(), 10)
        assert call.end_reason == "session closed"
        await asyncio.wait_for(peer.closed.wait(), 10)
    finally:
        await peer.pc.close()
        await _no_leaks(manager)


async def test_peer_that_never_connects_times_out() -> None:
    manager = _manager(connect_timeout_s=0.5)
    peer = await Peer.create()
    try:
        call = await manager.create_call(peer.pc.localDescription.sdp)
        await asyncio.wait_for(call.ended.wait(), 5)
        assert call.end_reason == "connect timeout" and len(manager) == 0
    finally:
        await peer.pc.close()
        await _no_leaks(manager)


async def test_shutdown_ends_live_calls() -> None:
    manager = _manager()
    peer = await Peer.create()
    try:
        call = await manager.create_call(peer.pc.localDescription.sdp)
        await peer.answer(call.answer_sdp)
        await asyncio.wait_for(peer.opened.wait(), 10)
        await manager.close()
        assert call.end_reason == "server shutdown" and call.ended.is_set()
        await asyncio.wait_for(peer.closed.wait(), 10)
        with pytest.raises(ShuttingDown):
            await manager.create_call(peer.pc.localDescription.sdp)
    finally:
        await peer.pc.close()
        await _no_leaks(manager)


async def test_rejected_offers_and_sessions_leak_nothing() -> None:
    manager = _manager()
    peer = await Peer.create()
    offer = peer.pc.localDescription.sdp
    await peer.pc.close()
    ScriptedSession.instances.clear()
    with pytest.raises(InvalidOffer):
        await manager.create_call("not an sdp")
    with pytest.raises(InvalidOffer):  # aiortc itself refuses: no codec in common
        await manager.create_call(offer.replace("m=audio", "m=video"))
    with pytest.raises(InvalidSessionConfig):
        await manager.create_call(offer, {"bad": 1})
    assert all(s.closed for s in ScriptedSession.instances)
    assert len(manager) == 0
    await _no_leaks(manager)


async def test_audio_only_and_channel_only_offers() -> None:
    manager = _manager()
    try:
        for audio, channel in ((True, False), (False, True)):
            pc = await _client(audio=audio, channel=channel)
            try:
                call = await manager.create_call(pc.localDescription.sdp)
                m_lines = [x.split()[0] for x in call.answer_sdp.splitlines() if x.startswith("m=")]
                assert m_lines == (["m=audio"] if audio else ["m=application"])
                await pc.setRemoteDescription(RTCSessionDescription(call.answer_sdp, "answer"))
                for _ in range(100):
                    if pc.connectionState == "connected":
                        break
                    await asyncio.sleep(0.05)
                assert pc.connectionState == "connected"
                await manager.hangup(call.id)
            finally:
                await pc.close()
    finally:
        await _no_leaks(manager)


def test_the_fast_audio_level_equals_aiortcs() -> None:
    """audio_level_dbov replaces aiortc's per-sample Python loop; it must give the same levels."""
    import aiortc.rtp

    from openrealtime.transports.webrtc import AIORTC_AUDIO_LEVEL as original
    from openrealtime.transports.webrtc import audio_level_dbov, use_fast_audio_level

    assert original is not None and original.__module__ == "aiortc.rtp"
    rng = np.random.default_rng(7)
    for amplitude in (0, 1, 3, 40, 300, 3000, 32767):
        for _ in range(5):
            data = rng.integers(-amplitude, amplitude + 1, 960, dtype=np.int16)
            frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 48_000
            assert audio_level_dbov(frame) == original(frame), amplitude
    loudest = av.AudioFrame.from_ndarray(np.full((1, 960), -32768, np.int16), format="s16", layout="mono")
    assert audio_level_dbov(loudest) == original(loudest) == 0
    assert use_fast_audio_level() and aiortc.rtp.compute_audio_level_dbov is audio_level_dbov
