"""smart-turn v3 and the noise suppressors against the real models and libraries."""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from openrealtime.backends.noise import RNNoiseSuppressor, WebRtcNoiseSuppressor, rnnoise_library_path
from openrealtime.backends.smart_turn import SmartTurnV3, default_model_path, fit_window, log_mel_features
from openrealtime.backends.speech import NoiseStream, NoiseSuppressor, TurnDetector
from openrealtime.backends.speech_registry import load_speech_backends
from tests import noise_fixtures as nf
from tests.audio_fixtures import silence, speak, speech_available

RATE = 16_000
needs_smart_turn = pytest.mark.skipif(default_model_path() is None or importlib.util.find_spec("onnxruntime") is None,
                                      reason="smart-turn needs `pip install --no-deps pipecat-ai` and onnxruntime")
needs_speech = pytest.mark.skipif(not speech_available(), reason="no speech synthesizer")
SUPPRESSORS = [pytest.param(RNNoiseSuppressor, marks=pytest.mark.skipif(rnnoise_library_path() is None,
                                                                        reason="pyrnnoise not installed")),
               pytest.param(WebRtcNoiseSuppressor, marks=pytest.mark.skipif(
                   importlib.util.find_spec("webrtc_noise_gain") is None, reason="webrtc-noise-gain not installed"))]


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurnV3:
    model = SmartTurnV3()
    model.load()
    return model


# ---------------------------------------------------------------- smart-turn


def test_model_file_is_found_without_importing_pipecat() -> None:
    code = ("import sys; from openrealtime.backends.smart_turn import default_model_path; "
            "p = default_model_path(); assert p is not None and p.name == 'smart-turn-v3.2-cpu.onnx', p; "
            "assert not [m for m in sys.modules if m.startswith('pipecat.audio')], 'pipecat was imported'")
    if default_model_path() is None:
        pytest.skip("pipecat-ai not installed")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_smart_turn
def test_features_match_whisper_feature_extraction() -> None:
    """Our numpy log-mel equals faster-whisper's extractor on the normalised 8 s window."""
    pytest.importorskip("faster_whisper")
    from faster_whisper.feature_extractor import FeatureExtractor

    audio = np.random.default_rng(0).standard_normal(3 * RATE).astype(np.float32) * 0.1
    ours = log_mel_features(audio)
    window = fit_window(audio)
    assert window.size == 8 * RATE and not window[: 5 * RATE].any()  # padded at the start
    window = (window - window.mean()) / np.sqrt(window.var() + 1e-7)
    theirs = FeatureExtractor(chunk_length=8)(window, padding=0)
    assert ours.shape == theirs.shape == (80, 800)
    assert np.abs(ours - theirs).max() < 1e-3
    long = np.random.default_rng(1).standard_normal(10 * RATE).astype(np.float32)
    assert np.array_equal(fit_window(long), long[-8 * RATE:])  # the last 8 s


@needs_smart_turn
@needs_speech
async def test_complete_question_scores_high_unfinished_sentence_low(smart_turn: SmartTurnV3) -> None:
    assert isinstance(smart_turn, TurnDetector)
    pause = silence(250, RATE)
    complete = await smart_turn.predict(silence(300, RATE) + speak("What is the capital of France?", RATE) + pause)
    first, _ = nf.speak_split("I would like to order a, pizza with cheese.", RATE)
    unfinished = await smart_turn.predict(silence(300, RATE) + first + pause)
    assert complete > 0.8, complete
    assert unfinished < 0.3, unfinished


@needs_smart_turn
async def test_prediction_latency_and_loop_stays_free(smart_turn: SmartTurnV3) -> None:
    pcm = speak("How many days are there in a week?", RATE) + silence(200, RATE)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    for _ in range(5):
        await smart_turn.predict(pcm)
    task.cancel()
    latency = statistics.median(smart_turn.latencies_ms[-5:])
    print(f"smart-turn median latency {latency:.1f} ms")
    assert latency < 300
    assert ticks >= 5  # the loop kept running while the model did


# ---------------------------------------------------------------- noise suppression


@pytest.mark.parametrize("impl", SUPPRESSORS)
@pytest.mark.parametrize("kind", ["near_field", "far_field"])
def test_suppressor_removes_noise_and_keeps_speech(impl: type, kind: str) -> None:
    suppressor = impl()
    assert isinstance(suppressor, NoiseSuppressor)
    stream = suppressor.new_stream(kind)
    assert isinstance(stream, NoiseStream)
    speech = nf.to_float(speak("Please set a timer for ten minutes.", RATE))
    lead = 2 * RATE
    mixed = nf.mix(speech, nf.white(lead + speech.size + RATE // 2, seed=1), 5, lead)
    out = nf.to_float(b"".join(stream.process_sync(nf.to_pcm16(mixed[i:i + 1600]))
                               for i in range(0, mixed.size, 1600)) + stream.flush())
    assert abs(out.size - mixed.size) <= 32  # the stream keeps time (a few samples of filter delay)
    noise_in = np.sqrt(np.mean(mixed[RATE:lead - 1600] ** 2))
    noise_out = np.sqrt(np.mean(out[RATE:lead - 1600] ** 2))
    speech_in = nf.active_rms(speech)
    speech_out = np.sqrt(np.mean(out[lead + 800:lead + speech.size - 800] ** 2))
    reduction_db = 20 * np.log10(noise_in / max(noise_out, 1e-3))
    print(f"{suppressor.name}/{kind}: noise -{reduction_db:.1f} dB, speech kept at "
          f"{20 * np.log10(speech_out / speech_in):+.1f} dB")
    assert reduction_db > 3
    assert speech_out > speech_in * 0.5  # within 6 dB


@pytest.mark.parametrize("impl", SUPPRESSORS)
async def test_suppressor_stream_async_path_matches_sync(impl: type) -> None:
    audio = nf.to_pcm16(nf.white(3 * RATE, seed=2) * 2000)
    a, b = impl().new_stream("near_field"), impl().new_stream("near_field")
    sync = b"".join(a.process_sync(audio[i:i + 3200]) for i in range(0, len(audio), 3200))
    # One small chunk inline, then a 2.9 s chunk (goes to a worker thread), then a reset.
    out = await b.process(audio[:3200]) + await b.process(audio[3200:])
    assert out == sync
    b.reset()
    assert await b.process(audio[:100]) == b""  # less than a frame is held back
    assert b.flush() == audio[:100]


def test_registry_builds_turn_and_noise_stages() -> None:
    built = load_speech_backends(SimpleNamespace(vad_enabled=False, stt_enabled=False, tts_enabled=False))
    if default_model_path() is not None:
        assert isinstance(built.turn, SmartTurnV3)
    if rnnoise_library_path() is not None:
        assert built.noise is not None and built.noise.name == "rnnoise"
    webrtc = load_speech_backends(SimpleNamespace(vad_enabled=False, stt_enabled=False, tts_enabled=False,
                                                  turn_detector_enabled=False, noise_suppressor="webrtc"))
    assert webrtc.turn is None
    if importlib.util.find_spec("webrtc_noise_gain") is not None:
        assert webrtc.noise is not None and webrtc.noise.name == "webrtc-ns"
    with pytest.raises(ValueError):
        load_speech_backends(SimpleNamespace(vad_enabled=False, stt_enabled=False, tts_enabled=False,
                                             noise_suppressor="nope"))
