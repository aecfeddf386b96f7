"""The multilingual Whisper base (whisper-base) on Spanish speech: with the language given and
detected, through the server's own STT backend; and its registry entry (joined, verified)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openrealtime.backends.gguf import ModelError
from openrealtime.backends.speech import STTError, TranscriptDone
from openrealtime.backends.speech_registry import load_speech_backends
from openrealtime.backends.whisper_models import cached_stt_model_path, ensure_stt_model
from openrealtime.backends.whisper_stt import WhisperSTT
from openrealtime.config import Settings
from tests.audio_fixtures import espeak, espeak_available, word_overlap
from tests.stt_models import install_whisper_base

pytest.importorskip("faster_whisper")
if not espeak_available():  # pragma: no cover
    pytest.skip("espeak-ng (the test voices in other languages) is not installed", allow_module_level=True)

SPANISH = "El perro corre por el parque todos los días."


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_whisper_base(tmp_path_factory.mktemp("stt-cache"))


@pytest.fixture(scope="module")
async def base(base_dir: Path):
    stt = WhisperSTT(base_dir, name="whisper-base")
    yield stt
    await stt.close()


async def transcribe(stt: WhisperSTT, pcm16k: bytes, language: str | None) -> TranscriptDone:
    done = None
    async for event in stt.transcribe(pcm16k, language=language):
        if isinstance(event, TranscriptDone):
            done = event
    assert done is not None
    return done


@pytest.mark.parametrize("language", ["es", "es-ES", None])
async def test_base_transcribes_spanish_given_or_detected(base: WhisperSTT, language: str | None):
    done = await transcribe(base, espeak(SPANISH, "es", 16000), language)
    assert done.language == "es", done  # detected right when no language was given
    assert word_overlap(SPANISH, done.text) >= 0.75, done.text


async def test_base_detects_english_too(base: WhisperSTT):
    text = "The dog runs through the park every day."
    done = await transcribe(base, espeak(text, "en-us", 16000), None)
    assert done.language == "en" and word_overlap(text, done.text) >= 0.75, done


async def test_unknown_language_code_is_refused(base: WhisperSTT):
    with pytest.raises(STTError) as exc:
        await transcribe(base, espeak(SPANISH, "es", 16000), "xx")
    assert exc.value.code == "unsupported_language"


def test_registry_joins_and_verifies(base_dir: Path):
    cache = base_dir.parent
    assert sorted(p.name for p in base_dir.iterdir()) == ["config.json", "model.bin", "tokenizer.json",
                                                           "vocabulary.txt"]
    assert (base_dir / "model.bin").stat().st_size == 145_217_532
    assert cached_stt_model_path("whisper-base", cache) == base_dir
    markers = json.loads((cache / "verified.json").read_text())
    assert str((base_dir / "model.bin").resolve()) in markers
    # A damaged cached file is noticed (size unchanged, so only the hash tells) and prepared again.
    model = base_dir / "model.bin"
    with open(model, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0" * 16)
    assert cached_stt_model_path("whisper-base", cache) is None
    assert ensure_stt_model("whisper-base", cache) == base_dir
    assert cached_stt_model_path("whisper-base", cache) == base_dir
    with pytest.raises(ModelError) as exc:
        ensure_stt_model("whisper-huge", cache)
    assert exc.value.code == "model_not_found"


async def test_settings_name_the_model(base_dir: Path):
    speech = load_speech_backends(Settings(stt_model="whisper-base", model_cache_dir=base_dir.parent,
                                           vad_enabled=False, tts_enabled=False, turn_detector_enabled=False,
                                           noise_suppressor="off"))
    stt = speech.stt
    assert isinstance(stt, WhisperSTT) and stt.name == "whisper-base"
    assert stt.model_path is None  # nothing prepared or loaded while building
    done = await transcribe(stt, espeak(SPANISH, "es", 16000), None)
    assert stt.model_path == base_dir and done.language == "es"
    await speech.close()
