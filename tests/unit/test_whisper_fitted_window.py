"""The parsing that decides whether a decode on a fitted Whisper window can be trusted."""

from __future__ import annotations

from openrealtime.backends.whisper_stt import compression_ratio, fitted_transcript

TB = 50_000  # the tokenizer's first timestamp token (<|0.00|>); one step is 20 ms


def ts(seconds: float) -> int:
    return TB + round(seconds / 0.02)


def decode(tokens: list[int]) -> str:
    return "  " + " ".join(f"w{t}" for t in tokens) + " "


def fitted(tokens: list[int], duration: float = 1.7, finished: bool = True) -> str | None:
    return fitted_transcript(tokens, TB, duration, decode, finished=finished)


def test_a_closed_segment_inside_the_audio_is_the_text() -> None:
    assert fitted([ts(0), 1, 2, ts(1.7)]) == "w1 w2"
    assert fitted([ts(0), 1, ts(1.0), ts(1.0), 2, 3, ts(1.9)], duration=2.0) == "w1 w2 w3"


def test_segments_read_from_the_padding_are_dropped_even_when_cut_off() -> None:
    # Whisper repeating the question in the silence after it, up to the length bound.
    assert fitted([ts(0), 1, 2, ts(2.0), ts(2.0), 1, 2, 1], finished=False) == "w1 w2"
    assert fitted([ts(0), 1, 2, ts(2.0), ts(2.0), 1, 2, ts(3.0)]) == "w1 w2"
    # A segment opening 0.1 s before the end or later counts as padding too.
    assert fitted([ts(0), 1, ts(1.2), ts(1.62), 9, ts(2.5)]) == "w1"


def test_untrustworthy_decodes_give_none() -> None:
    assert fitted([ts(0), 1, 2, 1, 2, 1], finished=False) is None  # the length bound, inside the audio
    assert fitted([ts(0), 1, ts(1.0)], finished=False) is None  # the bound, even if closed
    assert fitted([ts(0), 1, 2]) is None  # ended inside a segment
    assert fitted([1, 2, ts(1.0)]) is None  # text before any timestamp
    assert fitted([ts(0), ts(1.0)]) is None  # no words
    assert fitted([]) is None
    assert fitted([ts(1.65), 1, ts(2.5)]) is None  # everything from the padding


def test_compression_ratio_flags_repetition() -> None:
    assert compression_ratio("") == 0.0
    assert compression_ratio("What is the capital of France?") < 2.4
    assert compression_ratio("What is the capital of France? " * 8) > 2.4


def test_a_partial_decode_keeps_its_unclosed_last_segment() -> None:
    """Audio cut mid-speech (the prefill's words so far): Whisper often never closes the last
    segment or runs to the bound; a guess is wanted there, not the full window's redo."""
    assert fitted_transcript([ts(0), 1, 2], TB, 1.7, decode, finished=True, partial=True) == "w1 w2"
    assert fitted_transcript([ts(0), 1, ts(1.0), ts(1.0), 2, 3], TB, 1.7, decode, finished=False,
                             partial=True) == "w1 w2 w3"
    # Still nothing from the padding, and no text is still no text.
    assert fitted_transcript([ts(0), 1, ts(1.2), ts(1.65), 9], TB, 1.7, decode, finished=True, partial=True) == "w1"
    assert fitted_transcript([ts(0)], TB, 1.7, decode, finished=True, partial=True) is None
