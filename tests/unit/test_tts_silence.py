"""Trimming the TTS's silence: before a reply's first word, and where a clause was cut mid-sentence."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import numpy as np

from openrealtime.audio.quiet import QUIET, LeadTrimmer, split_tail, tail_keep_bytes
from openrealtime.engine import EngineContext, RealtimeSession

from .test_engine import ScriptedLLM, drain, send, user_text
from .test_voice_engine import ToneTTS, quiet, tone

RATE = 16_000


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2")


def test_lead_trimmer_keeps_5_ms_before_the_first_sound_even_across_chunks() -> None:
    trim = LeadTrimmer(RATE)
    assert trim.process(quiet(30, RATE)) == b""  # all silence: held back, in case sound follows
    sound = tone(50, RATE)
    onset = int(np.flatnonzero(np.abs(samples(sound)) > QUIET)[0])  # a sine starts at zero
    out = trim.process(quiet(10, RATE) + sound)
    assert int(np.flatnonzero(np.abs(samples(out)) > QUIET)[0]) == 80  # 5 ms of quiet, then the sound
    assert out.endswith(sound[onset * 2:])
    assert trim.dropped == (40 - 5) * 16 + onset
    later = quiet(40, RATE) + tone(10, RATE)
    assert trim.process(later) == later  # after the first sound everything passes unchanged


def test_lead_trimmer_leaves_a_chunk_that_starts_loud_alone() -> None:
    loud = tone(20, RATE)
    assert LeadTrimmer(RATE).process(loud) == loud


def test_split_tail_separates_the_trailing_silence() -> None:
    body, after = split_tail(tone(50, RATE) + quiet(100, RATE))
    assert len(after) >= 100 * 16 * 2 and body + after == tone(50, RATE) + quiet(100, RATE)
    assert np.abs(samples(body)[-1]) > QUIET
    assert split_tail(quiet(20, RATE)) == (b"", quiet(20, RATE))
    assert tail_keep_bytes(RATE) == 20 * 16 * 2


class PaddedTTS(ToneTTS):
    """Like Piper: every synthesis is 40 ms of silence, 100 ms of tone per word, 100 ms of silence."""

    async def synthesize(self, text: str, *, voice: str, speed: float = 1.0) -> AsyncIterator[bytes]:
        await asyncio.sleep(0)
        yield quiet(40, RATE) + b"".join(tone(100, RATE) for _ in text.split()) + quiet(100, RATE)


def gaps_ms(pcm24: bytes) -> list[int]:
    """Lengths of the quiet runs of 24 kHz audio, leading and trailing runs included."""
    loud = np.abs(samples(pcm24).astype(np.int32)) > QUIET
    edges = np.flatnonzero(np.diff(np.concatenate([[1], loud.astype(np.int8), [1]])))
    runs = edges.reshape(-1, 2) if edges.size % 2 == 0 else edges[:-1].reshape(-1, 2)
    return [int(b - a) * 1000 // 24_000 for a, b in runs if b - a >= 48]  # not a sine's zero crossings


async def spoken_reply(trim: bool, words: list[str], first_words: int = 2) -> bytes:
    async def resolve(model: str | None) -> ScriptedLLM:
        return ScriptedLLM(words)

    ctx = EngineContext(resolve_llm=resolve, default_model="m", default_instructions="Be brief.", tts=PaddedTTS(),
                        first_chunk_words=first_words, trim_tts_silence=trim)
    s = RealtimeSession(ctx, transport="websocket")
    await s.start()
    await drain(s)
    await send(s, {"type": "conversation.item.create", "item": user_text("Hi")})
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    assert events[-1]["response"]["status"] == "completed"
    await s.close()
    return b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")


async def test_a_reply_starts_on_its_first_word_and_a_mid_sentence_cut_has_no_pause() -> None:
    words = ["The ", "capital ", "of ", "France ", "is ", "Paris. ", "It ", "is ", "lovely."]
    # Clauses: "The capital " (2 words, cut mid-sentence), "of France is Paris. ", "It is lovely."
    plain = gaps_ms(await spoken_reply(False, words))
    trimmed = gaps_ms(await spoken_reply(True, words))
    assert plain[0] >= 39 and plain[1] >= 139, plain  # 40 ms before; 100 + 40 ms at the cut
    assert trimmed[0] <= 6, trimmed  # 5 ms before the first word
    assert trimmed[1] <= 26, trimmed  # 20 + 5 ms where the sentence goes on
    assert trimmed[2] >= 139, trimmed  # the pause after "Paris." is the TTS's own
    assert len(trimmed) == len(plain)


async def test_the_pauses_after_punctuation_are_kept() -> None:
    words = ["Yes, ", "of ", "course. ", "Bye."]
    trimmed = gaps_ms(await spoken_reply(True, words, first_words=4))
    assert trimmed[0] <= 6 and all(g >= 139 for g in trimmed[1:-1]), trimmed
