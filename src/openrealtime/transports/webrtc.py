"""WebRTC transport: one aiortc peer connection per call, adapted to a RealtimeSession.

A call is an SDP offer/answer exchange (`CallManager.create_call`), then JSON events over the
client-created `oai-events` data channel and audio over the media track. Everything a call starts
(tasks, the peer connection, the session) is owned by its `Call` and torn down in one place,
`Call._close`, whatever ended it: hangup, ICE/DTLS failure, the data channel closing, the session
closing, a peer that never connects, or server shutdown.

Audio: the caller's first audio track is decoded by aiortc, downmixed to mono PCM16 and pushed to
`session.push_audio`; the session speaks through a `PacedAudioTrack` (its `audio_output`), which
paces the outgoing frames itself and tells the engine what was actually sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fractions
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import av
import numpy as np
from aioice import Candidate, Connection
from aioice.candidate import candidate_foundation
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc import rtp as aiortc_rtp
from aiortc import sdp as aiortc_sdp
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError

from ..audio.output import AudioOutput
from ..audio.player import PacedAudioTrack
from ..config import IceConfig, Settings
from ..engine import EngineContext, InvalidSessionConfig, RealtimeSession
from ..protocol.events import ErrorDetail, ErrorEvent
from ..protocol.text import dumps_event

log = logging.getLogger("openrealtime.webrtc")

EVENTS_CHANNEL = "oai-events"
# Real offers are a few KiB (Chrome with every codec: ~10 KiB); anything far larger is abuse.
MAX_OFFER_BYTES = 256 * 1024
# Stop pulling events from the session while this much is unsent, so a client that stops
# reading cannot make us buffer without bound.
_SEND_HIGH_WATER = 1024 * 1024
_SEND_LOW_WATER = 256 * 1024
# Caller audio is handed to the engine in chunks of at least this long: decoded Opus frames are
# 20 ms already; shorter ones (10 ms ptime) are batched so the engine is not called 100 times/s.
_MIN_PUSH_MS = 20
# SCTP's max-message-size when the peer's SDP does not say (RFC 8841).
_DEFAULT_PEER_MAX_MESSAGE = 65536
_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"
# RFC 6465 audio level: full scale, and the floor (dBov) of silence.
_MAX_SAMPLE = 32767
_MIN_AUDIO_LEVEL = -127
# aiortc's own, kept before `use_fast_audio_level` replaces it (the tests compare the two).
AIORTC_AUDIO_LEVEL = getattr(aiortc_rtp, "compute_audio_level_dbov", None)


def shorten_input_jitter_buffer(pc: RTCPeerConnection, frames: int) -> None:
    """Hold `frames` (`webrtc_input_jitter_frames`) of each caller's audio instead of aiortc's 4.

    aiortc holds 4 frames (80 ms) for playout smoothness, but the engine does not play the audio:
    every turn's end was noticed 80 ms late. One frame (an Opus frame is complete when the next
    packet arrives) still mends adjacent swaps. aiortc has no option for it: the buffer is a private
    attribute, and if aiortc renames it the call says so and leaves aiortc's buffer.
    """
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "audio":
            continue
        receiver = transceiver.receiver
        if isinstance(getattr(receiver, _JITTER_ATTR, None), JitterBuffer):
            setattr(receiver, _JITTER_ATTR, JitterBuffer(capacity=16, prefetch=frames))
        else:
            log.warning("aiortc's receiver has no %s: the caller's audio keeps aiortc's 4-frame jitter buffer",
                        _JITTER_ATTR)

__all__ = [
    "EVENTS_CHANNEL",
    "Call",
    "CallManager",
    "InvalidOffer",
    "InvalidSessionConfig",
    "ShuttingDown",
    "SilenceTrack",
    "build_ice_servers",
    "frame_to_mono_pcm16",
    "parse_offer",
    "turn_rest_credentials",
]


def audio_level_dbov(frame: av.AudioFrame) -> int:
    """RFC 6465's audio level of an s16 frame, as `aiortc.rtp.compute_audio_level_dbov` computes it.

    aiortc's own sums the squares in a Python loop over every sample of every frame it sends: at
    16 calls that was 6.5% of the event loop's time (py-spy); numpy does it in microseconds. The
    same bytes (the whole plane), the same exact integer sum and the same rounding: equal results.
    """
    samples = np.frombuffer(bytes(frame.planes[0]), dtype="<i2").astype(np.int64)
    rms = math.sqrt(float(np.dot(samples, samples)) / (frame.samples * _MAX_SAMPLE * _MAX_SAMPLE))
    if rms <= 0:
        return _MIN_AUDIO_LEVEL
    return round(min(max(20 * math.log10(rms), _MIN_AUDIO_LEVEL), 0))


def use_fast_audio_level() -> bool:
    """Make aiortc's RTP sender compute the audio level with `audio_level_dbov` (once per process).

    False (and aiortc's own is kept) if aiortc no longer has the function it calls.
    """
    if AIORTC_AUDIO_LEVEL is None:
        log.warning("aiortc.rtp has no compute_audio_level_dbov: outgoing audio levels keep aiortc's code")
        return False
    aiortc_rtp.compute_audio_level_dbov = audio_level_dbov
    return True


class InvalidOffer(ValueError):
    """The client's SDP offer cannot start a call (the HTTP layer answers 400)."""


class ShuttingDown(RuntimeError):
    """The manager is closing: new calls are refused (the HTTP layer answers 503)."""


# --------------------------------------------------------------------------- offer validation


def _peer_max_message_size(channel: RTCDataChannel) -> int:
    """The largest message the peer accepts (its SDP `a=max-message-size`; 0: no limit).

    aiortc keeps it privately on the SCTP transport; without one the SCTP default (64 KiB) holds.
    """
    size = getattr(channel.transport, "_remote_max_message_size", _DEFAULT_PEER_MAX_MESSAGE)
    return size if isinstance(size, int) and size >= 0 else _DEFAULT_PEER_MAX_MESSAGE


def fit_message(event: dict[str, Any], limit: int) -> str:
    """The event as data-channel text no larger than `limit` bytes (0: unlimited).

    A retrieved item goes without its audio (what a data channel can carry of it; the audio itself
    is on the media track and over WebSocket); any other event that does not fit is replaced by an
    `error` naming it, so the call goes on and the client learns what it missed.
    """
    text = dumps_event(event)
    size = len(text.encode("utf-8"))
    if not limit or size <= limit:
        return text
    if event.get("type") == "conversation.item.retrieved":
        item = dict(event.get("item") or {})
        item["content"] = [{k: v for k, v in part.items() if k != "audio"} for part in item.get("content") or []]
        slim = dumps_event({**event, "item": item})
        if len(slim.encode("utf-8")) <= limit:
            return slim
    log.warning("a %s event of %d bytes exceeds the peer's data-channel limit of %d bytes; sent an error instead",
                event.get("type"), size, limit)
    return dumps_event(ErrorEvent(error=ErrorDetail(
        type="invalid_request_error", code="event_too_large",
        message=f"The server event '{event.get('type')}' ({size} bytes) is larger than the {limit}-byte "
                "messages this data channel accepts, so it was not sent. Its effect (if any) still applies; "
                "read large state over a WebSocket instead.")).wire())


def parse_offer(offer_sdp: str) -> aiortc_sdp.SessionDescription:
    """Reject what aiortc would silently accept (it parses any text into an empty description).

    Fingerprints are checked here too: aiortc takes any text, and the call then fails the DTLS
    handshake long after the 201 was sent; a client is better told at once, with a 400.
    """
    # Digest sizes of the algorithms aiortc verifies the peer's certificate with; it ignores others
    # (e.g. sha-1), so at least one of these must be present, and each must be well formed.
    digest_bytes = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
    hex_digits = set("0123456789abcdefABCDEF")
    if not isinstance(offer_sdp, str) or not offer_sdp.strip():
        raise InvalidOffer("The SDP offer is empty.")
    if len(offer_sdp.encode()) > MAX_OFFER_BYTES:
        raise InvalidOffer(f"The SDP offer is larger than {MAX_OFFER_BYTES} bytes.")
    text = offer_sdp.strip()
    if not text.startswith("v=0"):
        raise InvalidOffer("Not an SDP offer: it must start with 'v=0'.")
    try:
        desc = aiortc_sdp.SessionDescription.parse(text + "\r\n")
    except Exception as exc:  # the parser raises assorted errors on malformed lines
        raise InvalidOffer(f"Unparseable SDP offer: {exc}") from exc
    kinds = {m.kind for m in desc.media}
    if not kinds & {"audio", "application"}:
        raise InvalidOffer("The SDP offer has no audio or data channel (m=application) section.")
    for media in desc.media:
        if not (media.ice and media.ice.usernameFragment and media.ice.password):
            raise InvalidOffer(f"The SDP offer's {media.kind} section lacks ice-ufrag/ice-pwd.")
        if not (media.dtls and media.dtls.fingerprints):
            raise InvalidOffer(f"The SDP offer's {media.kind} section lacks a DTLS fingerprint.")
        usable = 0
        for fingerprint in media.dtls.fingerprints:
            size = digest_bytes.get(fingerprint.algorithm.lower())
            if size is None:
                continue
            octets = fingerprint.value.split(":")
            if len(octets) != size or any(len(o) != 2 or not set(o) <= hex_digits for o in octets):
                raise InvalidOffer(f"The SDP offer's {media.kind} section has a malformed "
                                   f"{fingerprint.algorithm} fingerprint: expected {size} hex octets "
                                   "separated by colons.")
            usable += 1
        if not usable:
            raise InvalidOffer(f"The SDP offer's {media.kind} section has no sha-256, sha-384 or sha-512 "
                               "DTLS fingerprint.")
    return desc


# --------------------------------------------------------------------------- ICE servers


def turn_rest_credentials(
    secret: str, ttl_s: int, *, now: float | None = None, user_id: str | None = None
) -> tuple[str, str]:
    """Time-limited TURN credentials that coturn (`use-auth-secret`) verifies without a user DB.

    username = "<expiry unix time>:<id>", credential = base64(HMAC-SHA1(secret, username)).
    """
    expiry = int(now if now is not None else time.time()) + int(ttl_s)
    username = f"{expiry}:{user_id or uuid.uuid4()}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def build_ice_servers(ice: IceConfig, *, now: float | None = None) -> list[dict[str, Any]]:
    """The `ice_servers` list clients hand to their RTCPeerConnection.

    TURN URLs are only listed when a shared secret is configured: browsers reject a `turn:` entry
    without username/credential, so listing it bare would break the client's peer connection.
    """
    servers: list[dict[str, Any]] = []
    if ice.stun_urls:
        servers.append({"urls": list(ice.stun_urls)})
    if ice.turn_urls and ice.turn_secret:
        username, credential = turn_rest_credentials(ice.turn_secret, ice.turn_ttl_s, now=now)
        servers.append({"urls": list(ice.turn_urls), "username": username, "credential": credential})
    return servers


# --------------------------------------------------------------------------- host candidates
#
# aioice (under aiortc) gathers host candidates from the machine's interfaces and skips
# 127.0.0.1, so a server that only offers those cannot be reached by a client on the same host
# without a network, and behind 1:1 NAT it advertises private addresses nobody can reach.
# aioice's `Connection.gather_candidates()` obtains the interface list and then calls
# `self.get_component_candidates(component=..., addresses=...)`, which binds one UDP socket per
# address. We wrap that method on each Connection instance (never the class, never aioice's
# module globals), between setRemoteDescription (which creates the ICE transports) and
# setLocalDescription (which gathers), so that it binds the configured addresses instead.
# Addresses not assigned to this host (a public IP behind 1:1 NAT) are served by a socket on the
# wildcard address whose candidate is rewritten to advertise the public IP with the same port.


def _bindable(address: str) -> bool:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


class HostAddressPlan:
    """Which addresses our ICE agent binds and advertises as host candidates."""

    def __init__(self, addresses: list[str], gather_interfaces: bool):
        local: list[str] = []
        mapped: list[str] = []
        for raw in addresses:
            try:
                ip = ipaddress.ip_address(raw.strip())
            except ValueError as exc:
                raise ValueError(f"ice.addresses: {raw!r} is not an IP address") from exc
            if ip.is_unspecified:
                raise ValueError(f"ice.addresses: {raw!r} cannot be advertised to a peer")
            (local if _bindable(str(ip)) else mapped).append(str(ip))
        if not local and not mapped and not gather_interfaces:
            raise ValueError("ice.addresses is empty and ice.gather_interfaces is off: "
                             "WebRTC calls would have no ICE candidates")
        self.local = list(dict.fromkeys(local))
        self.mapped = list(dict.fromkeys(mapped))
        self.gather_interfaces = gather_interfaces

    def install(self, connection: Connection) -> None:
        """Make `connection` gather candidates on our addresses (see the comment above)."""
        original = connection.get_component_candidates
        plan = self

        async def get_component_candidates(
            component: int, addresses: list[str], timeout: int = 5
        ) -> list[Candidate]:
            wanted = [*plan.local, *(addresses if plan.gather_interfaces else [])]
            candidates = await original(
                component=component, addresses=list(dict.fromkeys(wanted)), timeout=timeout
            )
            for public in plan.mapped:
                wildcard = "::" if ipaddress.ip_address(public).version == 6 else "0.0.0.0"
                extra = await original(component=component, addresses=[wildcard], timeout=timeout)
                for cand in extra:
                    if cand.type == "host":
                        # Same object as the socket's `protocol.local_candidate`: checks on the
                        # pair then name the public address the peer actually used.
                        cand.host = public
                        cand._network_host = public
                        cand.foundation = candidate_foundation("host", "udp", public)
                candidates += extra
            return candidates

        connection.get_component_candidates = get_component_candidates  # type: ignore[method-assign]

    def apply(self, pc: RTCPeerConnection) -> None:
        """Install on every ICE connection `pc` has after setRemoteDescription (bundled or not)."""
        dtls_transports = [t.receiver.transport for t in pc.getTransceivers()]
        if pc.sctp is not None:
            dtls_transports.append(pc.sctp.transport)
        seen: set[int] = set()
        for dtls in dtls_transports:
            gatherer = dtls.transport.iceGatherer
            if id(gatherer) in seen or gatherer.state != "new":
                continue
            seen.add(id(gatherer))
            self.install(gatherer._connection)


# --------------------------------------------------------------------------- media


class SilenceTrack(MediaStreamTrack):
    """Outgoing audio: 20 ms frames of 48 kHz mono silence, paced in real time.

    What a call sends when the manager's `outgoing_audio_factory` is set to it: a transport that
    speaks nothing (tests of the transport alone). The default is the paced player.
    """

    kind = "audio"
    RATE = 48_000
    SAMPLES = 960  # 20 ms
    _TIME_BASE = fractions.Fraction(1, RATE)
    _ZEROS = bytes(SAMPLES * 2)

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        else:
            delay = self._start + self._pts / self.RATE - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.2:  # the loop stalled: re-anchor instead of bursting to catch up
                self._start = loop.time() - self._pts / self.RATE
        frame = av.AudioFrame(format="s16", layout="mono", samples=self.SAMPLES)
        frame.planes[0].update(self._ZEROS)
        frame.sample_rate = self.RATE
        frame.pts = self._pts
        frame.time_base = self._TIME_BASE
        self._pts += self.SAMPLES
        return frame


def frame_to_mono_pcm16(frame: av.AudioFrame) -> bytes:
    """Caller audio as the engine takes it: mono PCM16 at the frame's own rate.

    aiortc's Opus decoder yields packed s16 stereo (both channels equal for a mono mic); other
    layouts and float formats are downmixed by averaging the channels.
    """
    fmt = frame.format
    channels = len(frame.layout.channels)
    if fmt.name in ("s16", "s16p") and channels == 1:
        return bytes(frame.planes[0])[: frame.samples * 2]
    if fmt.name == "s16" and channels == 2:
        # Every caller frame of every call passes here on the event loop (50 a second per call): read
        # from the plane itself this call takes ~13 us, through to_ndarray ~40 (timeit, 20 ms frames).
        both = np.frombuffer(frame.planes[0], dtype=np.int16, count=frame.samples * 2).astype(np.int32)
        return ((both[0::2] + both[1::2]) >> 1).astype("<i2").tobytes()
    data = frame.to_ndarray()
    if not fmt.is_planar:  # interleaved: one row of samples*channels values
        data = data.reshape(-1, channels).T
    if data.dtype.kind == "f":
        mono = np.clip(data.mean(axis=0) * 32768.0, -32768, 32767)
    elif data.dtype == np.int16:
        mono = data.sum(axis=0, dtype=np.int32) // channels
    elif data.dtype == np.int32:
        mono = (data.sum(axis=0, dtype=np.int64) // channels) >> 16
    elif data.dtype == np.uint8:
        mono = (data.sum(axis=0, dtype=np.int32) // channels - 128) << 8
    else:
        raise ValueError(f"unsupported audio sample format {fmt.name!r}")
    return mono.astype("<i2").tobytes()


# --------------------------------------------------------------------------- calls


def new_call_id(prefix: str = "rtc_") -> str:
    """`rtc_<24 hex>`; with shared state the prefix names the owning node (`rtc_<node>_`)."""
    return f"{prefix}{secrets.token_hex(12)}"


class Call:
    """One WebRTC call: a peer connection bridged to one RealtimeSession."""

    def __init__(self, manager: CallManager, session: RealtimeSession, model: str | None,
                 on_close: Callable[[], None] | None = None):
        self.id = new_call_id(manager.call_id_prefix)
        self.session = session
        self.model = model
        self.answer_sdp = ""
        self.created_at = time.monotonic()
        self.end_reason: str | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: see CallManager
        self.outgoing_audio: MediaStreamTrack | None = None
        self.incoming_audio: MediaStreamTrack | None = None  # the caller's mic: the first audio track
        self.channel: RTCDataChannel | None = None
        self.ended = asyncio.Event()  # set once everything is torn down
        self._manager = manager
        self._on_close = on_close  # told once the call is torn down (admission control frees its slot)
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._channel_open = asyncio.Event()
        self._send_ready = asyncio.Event()
        self._send_ready.set()
        self._inbound: asyncio.Queue[str | bytes] = asyncio.Queue()
        # Client events come from the data channel and from sidebands: one is applied at a time.
        self._handling = asyncio.Lock()
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)
        self.pc.on("iceconnectionstatechange", self._on_ice_state)

    # ---- lifecycle

    @property
    def closed(self) -> bool:
        return self._closing is not None

    async def _negotiate(self, offer_sdp: str) -> None:
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except (ValueError, OperationError, InvalidAccessError, InvalidStateError, InternalError) as exc:
            raise InvalidOffer(f"The SDP offer was rejected: {exc}") from exc
        # Before any packet arrives (the transport starts later).
        shorten_input_jitter_buffer(self.pc, self._manager.settings.webrtc_input_jitter_frames)
        # Answer `sendrecv` audio with a real track, on the first audio m-line only (one voice).
        # addTrack would create a new transceiver when the offer has no audio: check first.
        if any(t.kind == "audio" for t in self.pc.getTransceivers()):
            self.outgoing_audio = self._manager.outgoing_audio_factory()
            self.pc.addTrack(self.outgoing_audio)
        self._manager.address_plan.apply(self.pc)
        try:
            answer = await self.pc.createAnswer()
        except (ValueError, OperationError, InvalidAccessError, InvalidStateError, InternalError) as exc:
            raise InvalidOffer(f"Cannot answer the SDP offer: {exc}") from exc
        # aiortc gathers every candidate inside setLocalDescription (no trickle), so the answer
        # we return is complete.
        await self.pc.setLocalDescription(answer)
        self.answer_sdp = self.pc.localDescription.sdp
        sending = any(t.kind == "audio" and "send" in (t.currentDirection or "")
                      for t in self.pc.getTransceivers())
        if sending and isinstance(self.outgoing_audio, AudioOutput):
            # Before session.start(): the engine speaks through the track instead of sending
            # `response.output_audio.delta` events. A client that receives no audio (a sendonly
            # offer) never pulls frames, so it gets no player that would wait forever.
            self.session.audio_output = self.outgoing_audio  # type: ignore[attr-defined]

    def _run(self) -> None:
        self._started = True
        self._spawn(self._pump_events(), "pump")
        self._spawn(self._read_events(), "reader")
        self._spawn(self._connect_watchdog(self._manager.connect_timeout_s), "watchdog")

    def request_close(self, reason: str) -> None:
        """Start tearing the call down; safe from callbacks and from the call's own tasks."""
        if self._closing is not None:
            return
        self.end_reason = reason
        self._closing = asyncio.get_running_loop().create_task(self._close(), name=f"{self.id}:close")
        self._manager._track_closer(self._closing)

    async def close(self, reason: str = "closed") -> None:
        """End the call and wait until it is fully torn down."""
        self.request_close(reason)
        assert self._closing is not None
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._manager._calls.pop(self.id, None)
        try:
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self.session.close()
            except Exception:
                log.exception("call %s: closing the session failed", self.id)
            try:
                await self.pc.close()
            except Exception:
                log.exception("call %s: closing the peer connection failed", self.id)
            if self.outgoing_audio is not None:
                self.outgoing_audio.stop()
            if self._started:
                log.info("call %s ended (%s) after %.1f s", self.id, self.end_reason,
                         time.monotonic() - self.created_at)
        finally:
            if self._on_close is not None:
                self._on_close()
            self.ended.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("call %s: task %s crashed", self.id, task.get_name(), exc_info=exc)
            self.request_close(f"internal error in {task.get_name()}")

    # ---- peer connection events (synchronous: they run inside aiortc's emit)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connected.set()
            log.info("call %s connected", self.id)
        elif state in ("failed", "closed"):
            self.request_close(f"connection {state}")

    def _on_ice_state(self) -> None:
        if self.pc.iceConnectionState in ("failed", "closed"):
            self.request_close(f"ICE {self.pc.iceConnectionState}")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.incoming_audio is None:
            self.incoming_audio = track
            self._spawn(self._consume_mic(track), "mic")
        else:
            self._spawn(self._drain_track(track), f"track-{track.kind}")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_CHANNEL:
            log.info("call %s: ignoring data channel %r", self.id, channel.label)
            return
        if self.channel is not None:
            log.warning("call %s: ignoring a second %r data channel", self.id, EVENTS_CHANNEL)
            return
        self.channel = channel
        # Handlers are attached synchronously, inside aiortc's emit, before any message arrives.
        channel.on("message", self._inbound.put_nowait)
        channel.on("close", lambda: self.request_close("data channel closed"))
        channel.bufferedAmountLowThreshold = _SEND_LOW_WATER
        channel.on("bufferedamountlow", self._send_ready.set)
        if channel.readyState == "open":
            self._channel_open.set()
        else:
            channel.on("open", self._channel_open.set)

    # ---- tasks

    async def _pump_events(self) -> None:
        """Session outbox -> data channel, in order; waits (keeping events) until the channel opens."""
        while True:
            event = await self.session.outbox.get()
            if event is None:
                self.request_close("session closed")
                return
            await self._channel_open.wait()
            channel = self.channel
            if channel is None or channel.readyState != "open":
                self.request_close("data channel closed")
                return
            text = fit_message(event, _peer_max_message_size(channel))
            try:
                channel.send(text)
            except (ValueError, InvalidStateError, OSError) as exc:  # never let one event end the call
                log.warning("call %s: could not send %s: %s", self.id, event.get("type"), exc)
                if channel.readyState != "open":
                    self.request_close("data channel closed")
                    return
                continue
            if channel.bufferedAmount > _SEND_HIGH_WATER:
                self._send_ready.clear()
                await self._send_ready.wait()

    async def handle_client_event(self, raw: str | bytes) -> None:
        """Apply one client event (data channel or sideband); never two at once, so each event's
        handler finishes before the next starts, whichever connection sent it."""
        async with self._handling:
            try:
                await self.session.handle_text(raw)
            except Exception:  # the engine reports bad input as error events; this is a bug
                log.exception("call %s: session failed to handle an event", self.id)

    async def _read_events(self) -> None:
        """Data channel -> session, one event at a time so their order is kept."""
        while True:
            await self.handle_client_event(await self._inbound.get())

    async def _drain_track(self, track: MediaStreamTrack) -> None:
        """Pull frames nobody uses (a second audio track, video) so aiortc's queue never grows."""
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    async def _consume_mic(self, track: MediaStreamTrack) -> None:
        """Caller audio -> session as mono PCM16, in chunks of >= 20 ms so latency stays low."""
        push: Callable[[bytes, int], Coroutine[Any, Any, None]] | None = getattr(
            self.session, "push_audio", None)
        pending = bytearray()
        rate = 0
        failed_at: float | None = None
        warned = False

        async def flush() -> None:
            nonlocal failed_at
            chunk = bytes(pending)
            pending.clear()
            try:
                await push(chunk, rate)  # type: ignore[misc]
            except Exception:  # an engine bug must not end the call; log it, rate-limited
                now = time.monotonic()
                if failed_at is None or now - failed_at > 10:
                    failed_at = now
                    log.exception("call %s: the session failed to take caller audio", self.id)

        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if push is None:
                    continue  # an engine without audio input: keep draining
                try:
                    pcm = frame_to_mono_pcm16(frame)
                except ValueError:
                    if not warned:
                        warned = True
                        log.warning("call %s: dropping caller audio in format %s", self.id, frame.format.name)
                    continue
                if frame.sample_rate != rate and pending:
                    await flush()
                rate = frame.sample_rate
                pending += pcm
                if len(pending) * 1000 >= _MIN_PUSH_MS * rate * 2:
                    await flush()

    async def _connect_watchdog(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            log.warning("call %s: peer did not connect within %g s", self.id, timeout_s)
            self.request_close("connect timeout")


class CallManager:
    """Owns every live call, so hangup, sidebands and shutdown can find and end them.

    Our own ICE agent uses no STUN/TURN: it offers host candidates on `ice.addresses` (a public IP
    behind 1:1 NAT is advertised on a wildcard socket) plus, optionally, the interfaces. The
    configured STUN/TURN servers are for clients (`ice_servers()`); a client behind NAT reaches
    our public host candidate through them.
    """

    def __init__(
        self,
        settings: Settings,
        ctx: EngineContext,
        *,
        connect_timeout_s: float = 30.0,
        session_factory: Callable[..., RealtimeSession] = RealtimeSession,
    ):
        self.settings = settings
        self.ctx = ctx
        self.connect_timeout_s = connect_timeout_s
        use_fast_audio_level()
        # Builds each call's session; tests substitute a scripted one to exercise the transport alone.
        self.session_factory = session_factory
        self.address_plan = HostAddressPlan(settings.ice.addresses, settings.ice.gather_interfaces)
        # Builds the track each call sends to the client; when it is an AudioOutput (the paced
        # player) the session speaks through it. Tests may substitute a plain SilenceTrack.
        self.outgoing_audio_factory: Callable[[], MediaStreamTrack] = PacedAudioTrack
        self._calls: dict[str, Call] = {}
        # Several nodes (api/cluster.py) put the owner's node id in the call id: `rtc_<node>_`.
        self.call_id_prefix = "rtc_"
        self._closers: set[asyncio.Task[None]] = set()
        self._shut_down = False
        # aioice logs every connectivity check at INFO; keep server logs readable by default.
        if logging.getLogger("aioice").level == logging.NOTSET:
            logging.getLogger("aioice").setLevel(logging.WARNING)
        ice = settings.ice
        if ice.turn_urls and not ice.turn_secret:
            log.warning("ice.turn_urls is set without ice.turn_secret: TURN servers are not "
                        "offered to clients (only TURN REST credentials are supported)")
        if self.address_plan.mapped:
            log.info("WebRTC: advertising %s via wildcard sockets (not local addresses)",
                     ", ".join(self.address_plan.mapped))

    def ice_servers(self) -> list[dict[str, Any]]:
        """STUN/TURN entries for clients, with fresh TURN credentials on every call."""
        return build_ice_servers(self.settings.ice)

    def get(self, call_id: str) -> Call | None:
        return self._calls.get(call_id)

    def __len__(self) -> int:
        return len(self._calls)

    def live(self) -> list[Call]:
        return list(self._calls.values())

    async def create_call(
        self, offer_sdp: str, session: dict[str, Any] | None = None, model: str | None = None,
        api_key: str | None = None, on_close: Callable[[], None] | None = None,
    ) -> Call:
        """Answer an SDP offer; raises InvalidOffer or InvalidSessionConfig without leaking a peer.

        `api_key`: the caller's key, which the session's rate limits are counted against.
        `on_close`: called once when the call is torn down, also when negotiation fails.
        """
        if self._shut_down:
            raise ShuttingDown("The server is shutting down.")
        parse_offer(offer_sdp)
        extra = {"api_key": api_key} if api_key is not None else {}
        rt = self.session_factory(self.ctx, transport="webrtc", initial_session=session, model=model, **extra)
        call = Call(self, rt, model, on_close)
        try:
            await call._negotiate(offer_sdp.strip() + "\r\n")
            await rt.start()
        except BaseException:
            await call.close("negotiation failed")
            raise
        if call.closed:  # torn down while negotiating (a crashed task): never register it
            await call.close()
            raise RuntimeError(f"call failed to start: {call.end_reason}")
        self._calls[call.id] = call
        call._run()
        log.info("call %s started (model=%s, remote %s)", call.id, model or self.ctx.default_model,
                 _remote_summary(call.pc))
        return call

    async def hangup(self, call_id: str) -> bool:
        """End a call; False when no such call is live."""
        call = self._calls.get(call_id)
        if call is None:
            return False
        await call.close("hangup")
        return True

    async def close(self) -> None:
        """End every call (server shutdown) and wait for all teardowns, including earlier ones."""
        self._shut_down = True
        for call in list(self._calls.values()):
            call.request_close("server shutdown")
        while self._closers:
            await asyncio.gather(*list(self._closers), return_exceptions=True)

    def _track_closer(self, task: asyncio.Task[None]) -> None:
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)


def _remote_summary(pc: RTCPeerConnection) -> str:
    desc = pc.remoteDescription
    if desc is None:
        return "?"
    hosts = {
        line.split()[4]
        for line in desc.sdp.splitlines()
        if line.startswith("a=candidate:") and len(line.split()) > 4
    }
    return ", ".join(sorted(hosts)) or "no candidates"
