"""An aiortc client for the e2e tests: signaling in every dialect, the `oai-events` channel, a
microphone that plays PCM in real time, and a recorder of the audio the server sends back.

The client is stock aiortc with no STUN server (loopback only): its host candidates are this
machine's interface addresses and the server answers with 127.0.0.1 from `ice.addresses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import av
import httpx
import numpy as np
from aioice.ice import get_host_addresses
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from openrealtime.transports.webrtc import HostAddressPlan

from .conftest import Server, assert_valid_server_event

LOCATION = re.compile(r"^/v1/realtime/calls/(rtc_[A-Za-z0-9_-]+)$")  # `-`: node ids in shared-state call ids
MIC_RATE = 48_000
_FRAME = 960  # 20 ms at 48 kHz


class MicTrack(MediaStreamTrack):
    """A microphone that plays whatever PCM the test feeds it, in real time; silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()  # 48 kHz mono PCM16 not yet sent
        self._pts = 0
        self._start: float | None = None

    def say(self, pcm48: bytes) -> None:
        """Queue 48 kHz mono PCM16 after whatever is still playing."""
        self._pending += pcm48

    @property
    def remaining_ms(self) -> int:
        return len(self._pending) // 2 * 1000 // MIC_RATE

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        await asyncio.sleep(max(0.0, self._start + self._pts / MIC_RATE - loop.time()))
        chunk = bytes(self._pending[:_FRAME * 2])
        del self._pending[:_FRAME * 2]
        frame = av.AudioFrame(format="s16", layout="mono", samples=_FRAME)
        frame.planes[0].update(chunk.ljust(_FRAME * 2, b"\0"))
        frame.sample_rate = MIC_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, MIC_RATE)
        self._pts += _FRAME
        return frame


@dataclass(slots=True)
class Heard:
    """One frame of the server's audio as the client decoded it."""

    at: float  # time.monotonic() on arrival
    ms: float
    rms: float
    pcm: bytes  # mono PCM16 at `rate`
    rate: int


class Peer:
    """A WebRTC client: a microphone, the `oai-events` channel, validated events, heard audio."""

    def __init__(self, mic: MediaStreamTrack | None = None, record: bool = False, validate: bool = True) -> None:
        """`validate=False` (benchmarks): skip the schema checks, whose Node round trip blocks the loop."""
        self.validate = validate
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: stay on loopback
        self.mic = mic or AudioStreamTrack()
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.heard: list[Heard] = []
        self.last_event_at = 0.0  # arrival time of the event `next_event` returned last
        self._record = record
        self._recorder: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", lambda m: self._events.put_nowait((time.monotonic(), m)))
        self.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState in ("closed", "failed"):
            self.closed.set()

    async def offer(self) -> str:
        if not get_host_addresses(use_ipv4=True, use_ipv6=True):
            # Only loopback here (a network-less container): stock aiortc would offer no candidate.
            HostAddressPlan(["127.0.0.1"], gather_interfaces=False).apply(self.pc)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        if self._record:
            self._recorder = asyncio.create_task(self._record_audio(self.pc.getReceivers()[0].track))
        await asyncio.wait_for(self.opened.wait(), 20)
        assert self.pc.connectionState == "connected"

    async def _record_audio(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                data = frame.to_ndarray().astype(np.int32)
                channels = len(frame.layout.channels)
                mono = (data.reshape(-1, channels).mean(axis=1) if not frame.format.is_planar
                        else data.mean(axis=0))
                self.heard.append(Heard(
                    at=time.monotonic(), ms=frame.samples * 1000 / frame.sample_rate,
                    rms=float(np.sqrt(np.mean(mono ** 2))), pcm=mono.astype("<i2").tobytes(),
                    rate=frame.sample_rate))

    def heard_between(self, start: float, end: float = float("inf")) -> list[Heard]:
        return [h for h in self.heard if start <= h.at < end]

    def send(self, event: dict[str, Any] | str) -> None:
        self.channel.send(event if isinstance(event, str) else json.dumps(event))

    async def next_event(self, wait_s: float = 30) -> dict[str, Any]:
        at, raw = await asyncio.wait_for(self._events.get(), wait_s)
        event = json.loads(raw)
        if self.validate:
            assert_valid_server_event(event)
        self.last_event_at = at
        return event

    async def collect(self, until: str, wait_s: float = 90) -> list[dict[str, Any]]:
        """Events up to and including the first of type `until`."""
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(wait_s):
            while True:
                out.append(await self.next_event(wait_s))
                if out[-1]["type"] == until:
                    return out

    async def close(self) -> None:
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
        self.mic.stop()
        await self.pc.close()
        while self.validate and not self._events.empty():  # whatever arrived unread must be valid too
            assert_valid_server_event(json.loads(self._events.get_nowait()[1]))


def http(server: Server, key: str | None = "") -> httpx.AsyncClient:
    """A client with the server's key; `key=None` sends no Authorization header at all."""
    headers = {} if key is None else {"Authorization": f"Bearer {key or server.api_key}"}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30)


async def post_offer(server: Server, dialect: str, sdp: str,
                     session: dict | None = None) -> httpx.Response:
    async with http(server) as client:
        if dialect == "json":
            body: dict[str, Any] = {"sdp": sdp, **({"session": session} if session else {})}
            return await client.post("/v1/realtime/calls", json=body)
        if dialect == "json_accept_sdp":
            body = {"sdp": sdp, **({"session": session} if session else {})}
            return await client.post("/v1/realtime/calls", json=body, headers={"Accept": "application/sdp"})
        if dialect == "sdp":
            return await client.post("/v1/realtime/calls", content=sdp,
                                     headers={"Content-Type": "application/sdp"})
        files = {"sdp": (None, sdp, "application/sdp")}
        if session:
            files["session"] = (None, json.dumps(session), "application/json")
        return await client.post("/v1/realtime/calls", files=files)


def answer_of(dialect: str, response: httpx.Response) -> tuple[str, str]:
    """(call id, answer SDP) after checking the dialect's status, headers and body."""
    match = LOCATION.match(response.headers.get("location", ""))
    assert match, response.headers
    call_id = match.group(1)
    if dialect == "json":
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "sdp", "ice_servers"}
        assert body["id"] == call_id and isinstance(body["ice_servers"], list)
        sdp = body["sdp"]
    else:
        assert response.status_code == 201, response.text
        assert response.headers["content-type"].startswith("application/sdp")
        sdp = response.text
    assert sdp.startswith("v=0")
    assert re.search(r"^a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 \d+ typ host", sdp, re.M), sdp
    return call_id, sdp


async def open_call(server: Server, dialect: str = "sdp", session: dict | None = None,
                    peer: Peer | None = None) -> tuple[Peer, str, dict[str, Any]]:
    """A connected peer, its call id and the `session.created` event (always the first)."""
    peer = peer or Peer()
    try:
        response = await post_offer(server, dialect, await peer.offer(), session)
        call_id, sdp = answer_of(dialect, response)
        await peer.connect(sdp)
        created = await peer.next_event()
        assert created["type"] == "session.created"
    except BaseException:
        await peer.close()
        raise
    return peer, call_id, created


async def hangup(server: Server, call_id: str) -> httpx.Response:
    async with http(server) as client:
        return await client.post(f"/v1/realtime/calls/{call_id}/hangup")


async def wait_for_log(server: Server, pattern: str, wait_s: float = 20) -> re.Match[str]:
    for _ in range(int(wait_s / 0.1)):
        if match := re.search(pattern, server.log_text()):
            return match
        await asyncio.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the server log")
