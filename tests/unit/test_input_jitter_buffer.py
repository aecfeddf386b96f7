"""The caller's audio reaches the engine one frame after it arrives, not four (transports/webrtc.py)."""

from __future__ import annotations

import pytest
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from openrealtime.config import Settings
from openrealtime.transports.webrtc import shorten_input_jitter_buffer


def packet(seq: int) -> RtpPacket:
    p = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960, payload=bytes([seq % 256]))
    p._data = p.payload  # type: ignore[attr-defined]  # as the receiver does (depayloaded)
    return p


async def test_an_answering_peer_gets_a_one_frame_buffer_that_releases_each_frame_on_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENREALTIME_WEBRTC_INPUT_JITTER_FRAMES", raising=False)
    caller, server = RTCPeerConnection(), RTCPeerConnection()
    try:
        caller.addTransceiver("audio", direction="sendrecv")
        await caller.setLocalDescription(await caller.createOffer())
        await server.setRemoteDescription(caller.localDescription)
        frames = Settings().webrtc_input_jitter_frames
        assert frames == 1  # the default
        shorten_input_jitter_buffer(server, frames)
        [transceiver] = server.getTransceivers()
        buffer = getattr(transceiver.receiver, "_RTCRtpReceiver__jitter_buffer")  # noqa: B009
        assert isinstance(buffer, JitterBuffer)  # fails if aiortc renames it: then 80 ms come back
        released = [buffer.add(packet(seq))[1] for seq in range(100, 106)]
        assert released[0] is None  # a frame is complete only once the next packet arrives
        assert [f.timestamp // 960 if f else None for f in released[1:]] == [100, 101, 102, 103, 104]
        # A packet swapped with its neighbour is still put in order (aiortc releases one frame per
        # packet, so the swap costs one frame of delay from there on).
        buffer = JitterBuffer(capacity=16, prefetch=frames)
        order = [buffer.add(packet(seq))[1] for seq in (200, 202, 201, 203, 204, 205)]
        assert [f.timestamp // 960 for f in order if f] == [200, 201, 202, 203]
    finally:
        await caller.close()
        await server.close()
