"""audio.transcode: impossible headers are refused and decoding stops at the duration cap."""

from __future__ import annotations

import io
import struct
import time

import av
import numpy as np
import pytest

from openrealtime.audio.transcode import AudioDecodeError, AudioTooLong, decode_audio


def wav(rate: int, channels: int = 1, frames: bytes = b"\0\0" * 160) -> bytes:
    block = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(frames)) + frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


def encoded(fmt: str, codec: str, seconds: int, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        block = np.zeros((1, rate), dtype=np.int16)
        for i in range(seconds):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = i * rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("rate", [0, 1, 7999, 192_001, 2**32 - 1])
def test_impossible_wav_rates_are_refused(rate: int):
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(wav(rate), "a.wav", rate=16000)
    assert info.value.code == "invalid_audio" and "sample rate" in str(info.value)


@pytest.mark.parametrize("channels", [0, 9, 65535])
def test_impossible_channel_counts_are_refused(channels: int):
    with pytest.raises(AudioDecodeError):
        decode_audio(wav(16000, channels, frames=b"\0" * 4 * max(channels, 1)), "a.wav", rate=16000)


def test_wav_cap():
    ten_s = wav(8000, frames=b"\0\0" * 8000 * 10)
    assert len(decode_audio(ten_s, "a.wav", rate=16000, max_duration_s=10)) == 16000 * 2 * 10
    with pytest.raises(AudioTooLong) as info:
        decode_audio(ten_s, "a.wav", rate=16000, max_duration_s=9.5)
    assert info.value.code == "audio_too_long"


def test_raw_pcm_cap():
    assert decode_audio(b"\0\0" * 24000, "a.pcm", rate=24000, max_duration_s=1) == b"\0\0" * 24000
    with pytest.raises(AudioTooLong):
        decode_audio(b"\0\0" * 24001, "a.pcm", rate=24000, max_duration_s=1)


def test_flac_within_the_cap_decodes():
    pcm = decode_audio(encoded("flac", "flac", 5), "a.flac", rate=16000, max_duration_s=6)
    assert abs(len(pcm) / 2 / 16000 - 5) < 0.05


def test_decoding_stops_at_the_cap():
    data = encoded("flac", "flac", 3600)  # an hour of silence: a few hundred KB
    start = time.perf_counter()
    with pytest.raises(AudioTooLong):
        decode_audio(data, "a.flac", rate=16000, max_duration_s=30)
    capped = time.perf_counter() - start
    start = time.perf_counter()
    full = decode_audio(data, "a.flac", rate=16000)
    uncapped = time.perf_counter() - start
    assert len(full) == 3600 * 16000 * 2
    # 30 s of an hour decoded: far less work than all of it (generous against noisy neighbours).
    assert capped < uncapped / 4, (capped, uncapped)


def test_garbage_is_invalid_audio():
    with pytest.raises(AudioDecodeError):
        decode_audio(b"not audio at all" * 10, "a.mp3", rate=16000)
