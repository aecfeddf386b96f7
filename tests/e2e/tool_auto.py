"""What the Python and JS agent-SDK tests of tool_choice "auto" share: the default model's server,
the spoken question, the tool's answer and how to spot it in speech."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from openrealtime.backends.gguf import get_known_model, is_installed

from ..audio_fixtures import speech_available
from .conftest import Server, start_server, stop_server

MODEL = "qwen2.5-1.5b"
QUESTION = "What's the weather in Paris?"
WAIT_S = 120
TOOL_SYNTAX = ("{", "<tool_call>", "get_weather")


def weather(city: str) -> str:
    """The tool's answer (also in driver_ws.mjs, getWeatherAuto)."""
    return f"It is 23 degrees and sunny in {city}."


def says_23(transcript: str) -> bool:
    text = transcript.lower()
    return "23" in text or "twenty-three" in text or "twenty three" in text


def default_model_server(name: str) -> Iterator[Server]:
    """A server on the default model for a module's tests (skips without the model or speech); its
    log must end clean."""
    model = get_known_model(MODEL)
    if model is None or not is_installed(model):
        pytest.skip(f"{MODEL} is not installed (openrealtime models install {MODEL})")
    if not speech_available():
        pytest.skip("no speech synthesizer for the test audio")
    srv = start_server({"OPENREALTIME_LLM_MODEL": MODEL}, name=name)
    yield srv
    stop_server(srv)
    text = srv.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Task was destroyed" not in text, text[-4000:]
