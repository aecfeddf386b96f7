"""A spoken turn in Spanish over WebSocket (the `openai` SDK) on a server configured with the
multilingual Whisper base: `audio.input.transcription.language` given, and detected."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from openrealtime.config import load_settings
from tests.audio_fixtures import espeak, espeak_available, silence, word_overlap
from tests.stt_models import install_whisper_base

from .conftest import Server, client, start_server, stop_server
from .test_voice_websocket import RATE, Recorder, send_audio

pytestmark = pytest.mark.e2e
if not espeak_available():  # pragma: no cover
    pytest.skip("espeak-ng (the test voices in other languages) is not installed", allow_module_level=True)

SPANISH = "Por favor, reserva una mesa para dos esta noche."
GERMAN = "Der Hund läuft jeden Tag durch den Park."


@pytest.fixture(scope="module")
def multilingual_server() -> Iterator[Server]:
    install_whisper_base(load_settings().model_cache_dir)  # the server prepares it in the same cache
    srv = start_server({"OPENREALTIME_STT_MODEL": "whisper-base", "OPENREALTIME_TTS_ENABLED": "false"},
                       name="multilingual")
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text()


def session(language: str | None) -> dict:
    transcription = {"model": "whisper-1", **({"language": language} if language else {})}
    return {"type": "realtime", "output_modalities": ["text"],
            "instructions": "Answer in one short sentence.", "max_output_tokens": 16,
            "audio": {"input": {"transcription": transcription,
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}


@pytest.mark.parametrize(("language", "text", "voice"), [("es", SPANISH, "es"), (None, GERMAN, "de")],
                         ids=["spanish-given", "german-detected"])
async def test_transcript_in_the_session_language(multilingual_server: Server, language: str | None,
                                                  text: str, voice: str):
    async with client(multilingual_server).realtime.connect(model="gpt-realtime") as conn:
        rec = Recorder(conn)
        await rec.wait_for("session.created")
        await conn.session.update(session=session(language))  # type: ignore[arg-type]
        updated = await rec.wait_for("session.updated")
        echoed = updated["session"]["audio"]["input"]["transcription"]
        # One STT model serves the server: hosted names map to it, and session.updated says which.
        assert echoed["model"] == "whisper-base" and echoed.get("language") == language, echoed
        await send_audio(conn, silence(400, RATE) + espeak(text, voice, RATE) + silence(1200, RATE))
        completed = await rec.wait_for("conversation.item.input_audio_transcription.completed", timeout=120)
        await rec.wait_for("response.done", timeout=120)
        rec.task.cancel()
    assert word_overlap(text, completed["transcript"]) >= 0.7, completed
    assert not [e for e in rec.events if e["type"] == "error"]
