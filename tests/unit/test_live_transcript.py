"""The delta-stabilising logic of transcription sessions (engine/live_transcript.py)."""

from __future__ import annotations

import math

from openrealtime.engine.live_transcript import StableTranscript, Word, hypothesis, join, logprob_entries

# Real partial decodes of one utterance by Whisper tiny.en (0.5 s, 1 s, ... of a Piper sentence).
PARTIALS = [
    "the quick brown fox",
    "The quick brown fox jumps over the lazy...",
    "The quick brown fox jumps over the lazy dog, and then it-",
    "The quick brown fox jumps over the lazy dog and then it runs far away.",
]
FINAL = "The quick brown fox jumps over the lazy dog, and then it runs far way into the quiet forest."


def run(partials: list[str], final: str) -> tuple[list[str], str]:
    """(deltas sent, transcript) the way engine/transcription.py sends them."""
    stable = StableTranscript()
    deltas = []
    for text in partials:
        first = not stable.sent
        new = stable.update(hypothesis(text))
        if new:
            deltas.append(join(new, first))
    first = not stable.sent
    rest = stable.finish(hypothesis(final))
    if rest:
        deltas.append(join(rest, first))
    return deltas, stable.text


def test_words_are_sent_once_two_decodes_agree():
    stable = StableTranscript()
    assert stable.update(hypothesis(PARTIALS[0])) == []  # one hypothesis: nothing is known yet
    # "the"/"The" agree up to case (written as the later decode writes it); "lazy..." / "lazy" differ
    # in punctuation, so that word waits.
    assert join(stable.update(hypothesis(PARTIALS[1])), True) == "The quick brown fox"
    assert join(stable.update(hypothesis(PARTIALS[2])), False) == " jumps over the"
    # "dog," / "dog": not agreed yet, nor anything after it.
    assert join(stable.update(hypothesis(PARTIALS[3])), False) == " lazy"
    assert stable.text == "The quick brown fox jumps over the lazy"


def test_concatenated_deltas_equal_the_final_transcript():
    deltas, transcript = run(PARTIALS, FINAL)
    assert "".join(deltas) == transcript == FINAL
    assert deltas[-1] == " dog, and then it runs far way into the quiet forest."


def test_a_revision_of_sent_words_keeps_deltas_and_transcript_consistent():
    # The final decode rewrote a word already sent ("fox" -> "box"): it is not repeated, and the
    # rest continues after it.
    deltas, transcript = run(["a quick brown fox", "a quick brown fox jumps"], "A quick brown box jumps high.")
    assert deltas == ["a quick brown fox", " jumps high."]
    assert "".join(deltas) == transcript == "a quick brown fox jumps high."
    # Sent words the final decode drops entirely.
    deltas, transcript = run(["one two three", "one two three four"], "one two")
    assert "".join(deltas) == transcript == "one two three"
    # Nothing in common at all.
    deltas, transcript = run(["foo bar", "foo bar baz"], "hello world again")
    assert "".join(deltas) == transcript == "foo bar again"


def test_a_partial_that_revises_sent_words_adds_nothing_until_one_agrees_again():
    stable = StableTranscript()
    stable.update(hypothesis("I want to"))
    assert join(stable.update(hypothesis("I want to go")), True) == "I want to"
    assert stable.update(hypothesis("I went to go home")) == []  # contradicts "want"
    assert stable.update(hypothesis("I want to go home now")) == []  # the previous one disagreed
    assert join(stable.update(hypothesis("I want to go home now please")), False) == " go home now"


def test_no_speech_and_empty_decodes():
    deltas, transcript = run([], "")
    assert deltas == [] and transcript == ""
    deltas, transcript = run(["", ""], "Hello.")
    assert deltas == ["Hello."] and transcript == "Hello."
    deltas, transcript = run(["Hello there", "Hello there"], "")
    assert "".join(deltas) == transcript == "Hello there"


def test_word_probabilities_become_logprobs_that_spell_the_delta():
    # faster-whisper's words: "it-" comes as two pieces; their log probabilities add up.
    words = hypothesis("Then it- runs", [("Then", 0.9), ("it", 0.5), ("-", 0.25), ("runs", 1.0)])
    assert [w.text for w in words] == ["Then", "it-", "runs"]
    assert math.isclose(words[1].logprob or 0, math.log(0.5) + math.log(0.25))
    assert words[2].logprob == 0.0
    entries = logprob_entries(words, first=False)
    assert "".join(e["token"] for e in entries) == join(words, False) == " Then it- runs"
    assert entries[0] == {"token": " Then", "logprob": round(math.log(0.9), 6), "bytes": list(b" Then")}
    first = logprob_entries(words[:1], first=True)
    assert first[0]["token"] == "Then" and first[0]["bytes"] == list(b"Then")


def test_words_the_stt_does_not_spell_get_no_logprob():
    words = hypothesis("Hello world", [("Hullo", 0.5), ("world", 0.8)])
    assert words[0] == Word("Hello") and words[1].logprob is not None
    assert [e["token"] for e in logprob_entries(words, True)] == [" world"]
    # A probability of zero is clamped to a finite log probability.
    assert math.isfinite(hypothesis("x", [("x", 0.0)])[0].logprob or 0)
