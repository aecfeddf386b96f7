"""Audio files in and out of the OpenAI audio endpoints: decode uploads, encode streamed speech.

Decoding: PCM16 WAV and raw PCM are read directly; anything else (mp3, ogg/opus, webm, flac, m4a,
other WAV encodings) goes through PyAV (FFmpeg), if installed. Encoding for ``/v1/audio/speech``:
``pcm`` (raw PCM16) and ``wav`` directly, ``mp3``/``opus``/``aac``/``flac`` through PyAV, chunk by
chunk so the first audio can be sent before the rest is synthesized.

Uploads are untrusted: a header may claim any sample rate or channel count, and a small file can
expand into hours of audio (a 400-byte WAV "at 1 Hz", ten minutes of silence in 114 KB of FLAC).
Sample rates outside 8..192 kHz and channel counts outside 1..8 are refused, and decoding stops as
soon as the audio exceeds the caller's ``max_duration_s``, so the work done is bounded by the cap,
not by what the file claims.
"""

from __future__ import annotations

import io
import struct
import wave
from typing import Any

import numpy as np

from .resample import resample

# Formats /v1/audio/speech can produce, and their content types.
SPEECH_FORMATS = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}
# (container, codec) for the PyAV-encoded formats.
_AV_FORMATS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"),
               "flac": ("flac", "flac")}


# What a real recording can have; anything else is a broken or hostile header.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MAX_CHANNELS = 8


class AudioDecodeError(ValueError):
    """The upload is not audio we can read (a client error: 400 ``invalid_audio``)."""

    code = "invalid_audio"


class AudioTooLong(AudioDecodeError):
    """The upload decodes to more audio than the caller allows (400 ``audio_too_long``)."""

    code = "audio_too_long"


def _check_format(rate: int, channels: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(f"Unsupported sample rate {rate} Hz: audio must be {MIN_SAMPLE_RATE} to "
                               f"{MAX_SAMPLE_RATE} Hz.")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioDecodeError(f"Unsupported channel count {channels}: audio must have 1 to {MAX_CHANNELS} "
                               "channels.")


def _too_long(max_duration_s: float) -> AudioTooLong:
    return AudioTooLong(f"The audio is longer than the maximum of {max_duration_s:g} seconds.")


def _mono_pcm16(samples: np.ndarray, channels: int) -> np.ndarray:
    if channels > 1:
        samples = samples[: len(samples) // channels * channels].reshape(-1, channels).astype(np.int32)
        samples = samples.mean(axis=1)
    return np.clip(np.round(samples), -32768, 32767).astype("<i2")


def _decode_wav(data: bytes, max_duration_s: float | None = None) -> tuple[bytes, int] | None:
    """PCM16 WAV -> (mono PCM16, rate); None for other WAV encodings (left to PyAV)."""
    try:
        with wave.open(io.BytesIO(data)) as fh:
            if fh.getsampwidth() != 2 or fh.getcomptype() != "NONE":
                return None
            channels, rate = fh.getnchannels(), fh.getframerate()
            _check_format(rate, channels)
            wanted = fh.getnframes()
            if max_duration_s is not None:
                wanted = min(wanted, int(max_duration_s * rate) + 1)  # one frame more shows the excess
            frames = fh.readframes(wanted)
    except (wave.Error, EOFError):
        return None
    if max_duration_s is not None and len(frames) // (2 * channels) > max_duration_s * rate:
        raise _too_long(max_duration_s)
    samples = np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2")
    return _mono_pcm16(samples, channels).tobytes(), rate


def _decode_av(data: bytes, max_duration_s: float | None = None) -> tuple[bytes, int]:
    """Any format FFmpeg reads -> (mono PCM16, rate), frame by frame, stopping at the cap."""
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency of faster-whisper
        raise AudioDecodeError("Only WAV (PCM16) and raw PCM uploads are supported on this server "
                               "(install PyAV for other formats).") from None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("The file has no audio stream.")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            if rate:  # the header's claim, checked before any decoding (0 = unknown until decoded)
                _check_format(rate, stream.codec_context.channels or 1)
            resampler: Any = None
            decoded_s = 0.0
            chunks: list[np.ndarray] = []
            for frame in container.decode(stream):
                if resampler is None:
                    rate = frame.sample_rate
                    _check_format(rate, frame.layout.nb_channels)
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
                if frame.sample_rate:
                    decoded_s += frame.samples / frame.sample_rate
                if max_duration_s is not None and decoded_s > max_duration_s:
                    raise _too_long(max_duration_s)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
    except AudioDecodeError:
        raise
    except Exception as exc:
        raise AudioDecodeError(f"Could not decode the audio file: {exc}") from None
    pcm = np.concatenate(chunks).astype("<i2") if chunks else np.zeros(0, "<i2")
    return pcm.tobytes(), rate or MIN_SAMPLE_RATE


def decode_audio(data: bytes, filename: str | None, *, rate: int, raw_rate: int = 24000,
                 max_duration_s: float | None = None) -> bytes:
    """An uploaded audio file as mono PCM16 at ``rate``.

    Files named ``*.pcm`` / ``*.raw`` are raw little-endian mono PCM16 at ``raw_rate`` (24 kHz, the
    rate of OpenAI's ``pcm`` speech output). Raises ``AudioDecodeError`` for what is not audio or has
    an impossible format, ``AudioTooLong`` (without decoding the rest) past ``max_duration_s``.
    """
    if not data:
        raise AudioDecodeError("The audio file is empty.")
    name = (filename or "").lower()
    if name.endswith((".pcm", ".raw")):
        if len(data) % 2:
            raise AudioDecodeError("Raw PCM must be a whole number of 16-bit samples.")
        if max_duration_s is not None and len(data) // 2 > max_duration_s * raw_rate:
            raise _too_long(max_duration_s)
        pcm, src_rate = data, raw_rate
    else:
        wav = _decode_wav(data, max_duration_s) if data[:4] == b"RIFF" else None
        pcm, src_rate = wav if wav is not None else _decode_av(data, max_duration_s)
    return resample(pcm, src_rate, rate)


def wav_header(rate: int, data_bytes: int | None = None) -> bytes:
    """A mono PCM16 WAV header; unknown length (streaming) uses the maximum sizes, as OpenAI does."""
    size = 0xFFFFFFFF - 36 if data_bytes is None else data_bytes
    return (b"RIFF" + struct.pack("<I", min(0xFFFFFFFF, 36 + size)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", size))


class _Sink:
    """A write-only file object PyAV muxes into; the bytes are taken out after every write."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: Any) -> int:
        self.buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class StreamEncoder:
    """Encodes a PCM16 stream at ``rate`` into one of ``SPEECH_FORMATS``, chunk by chunk."""

    def __init__(self, fmt: str, rate: int):
        if fmt not in SPEECH_FORMATS:
            raise ValueError(f"unsupported format {fmt!r}")
        self.fmt = fmt
        self.rate = rate
        self.content_type = SPEECH_FORMATS[fmt]
        self._started = False
        self._container: Any = None
        if fmt in _AV_FORMATS:
            import av

            container_format, codec = _AV_FORMATS[fmt]
            self._sink = _Sink()
            self._container = av.open(self._sink, mode="w", format=container_format)
            self._stream = self._container.add_stream(codec, rate=rate, layout="mono")
            self._pts = 0

    def encode(self, pcm16: bytes) -> bytes:
        if self._container is None:
            head = b""
            if not self._started and self.fmt == "wav":
                head = wav_header(self.rate)
            self._started = True
            return head + pcm16
        if not pcm16:
            return b""
        import av

        samples = np.frombuffer(pcm16, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += samples.shape[1]
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        if self._container is None:
            return b"" if self._started or self.fmt != "wav" else wav_header(self.rate, 0)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        self._started = True
        return self._sink.take()

    def close(self) -> None:
        """Release the encoder without flushing (stream abandoned)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
