"""PCM16 <-> G.711 (μ-law, A-law) with numpy lookup tables (audioop is gone in Python 3.13)."""

from __future__ import annotations

import numpy as np


def _ulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


_ULAW_DECODE = _ulaw_table()
_ALAW_DECODE = _alaw_table()


def _encoder(decode_table: np.ndarray) -> np.ndarray:
    # For every 16-bit value, the code whose decoded value is nearest (ties to the lower code).
    order = np.argsort(decode_table, kind="stable")
    values = decode_table[order].astype(np.int32)
    pcm = np.arange(-32768, 32768, dtype=np.int32)
    idx = np.clip(np.searchsorted(values, pcm), 1, len(values) - 1)
    left, right = values[idx - 1], values[idx]
    pick = np.where(pcm - left <= right - pcm, idx - 1, idx)
    return order[pick].astype(np.uint8)


_ULAW_ENCODE = _encoder(_ULAW_DECODE)
_ALAW_ENCODE = _encoder(_ALAW_DECODE)


def ulaw_to_pcm16(data: bytes) -> bytes:
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)].tobytes()


def alaw_to_pcm16(data: bytes) -> bytes:
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)].tobytes()


def pcm16_to_ulaw(data: bytes) -> bytes:
    samples = np.frombuffer(data, dtype="<i2").astype(np.int32) + 32768
    return _ULAW_ENCODE[samples].tobytes()


def pcm16_to_alaw(data: bytes) -> bytes:
    samples = np.frombuffer(data, dtype="<i2").astype(np.int32) + 32768
    return _ALAW_ENCODE[samples].tobytes()


def decode_to_pcm16(data: bytes, fmt: str) -> bytes:
    """Wire audio in `fmt` ("audio/pcm", "audio/pcmu", "audio/pcma") to little-endian PCM16."""
    if fmt == "audio/pcmu":
        return ulaw_to_pcm16(data)
    if fmt == "audio/pcma":
        return alaw_to_pcm16(data)
    if len(data) % 2:
        raise ValueError("audio/pcm data must be a whole number of 16-bit samples")
    return data


def encode_from_pcm16(data: bytes, fmt: str) -> bytes:
    if fmt == "audio/pcmu":
        return pcm16_to_ulaw(data)
    if fmt == "audio/pcma":
        return pcm16_to_alaw(data)
    return data
