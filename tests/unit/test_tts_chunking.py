"""Bounded pieces for speech synthesis: Piper's `split_text` and the engine's `ClauseSplitter`.

Synthesis memory grows with the length of what is synthesized at once (issue 10 finding 7), so
both must bound every piece whatever the text looks like, without losing or reordering words.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from openrealtime.backends.piper_tts import MAX_PIECE_CHARS, split_text
from openrealtime.engine.clauses import ClauseSplitter

WORDS = "the quick brown fox jumps over a lazy dog while children play in the garden".split()


def unpunctuated(chars: int) -> str:
    out: list[str] = []
    i = 0
    while sum(len(w) + 1 for w in out) <= chars:
        out.append(WORDS[i % len(WORDS)])
        i += 1
    return " ".join(out)[:chars].strip()


def squeeze(text: str) -> str:
    return "".join(text.split())


# ------------------------------------------------------------------ split_text


def test_text_that_fits_is_one_piece_unchanged():
    text = "Dr. Smith met Mr. Jones. He said hello, and left."
    assert split_text(text) == [text]
    assert split_text("  padded  \n") == ["padded"]
    assert split_text("") == [] and split_text(" \n\t ") == []


def test_no_punctuation_is_cut_at_word_boundaries():
    text = unpunctuated(4096)
    pieces = split_text(text, 200)
    assert all(0 < len(p) <= 200 for p in pieces)
    assert len(pieces) <= 4096 // 150  # cut late, not into crumbs
    assert " ".join(pieces) == text  # every cut replaced exactly one space: no word was split
    assert all(p.split()[-1] in WORDS and p.split()[0] in WORDS for p in pieces)


def test_sentence_ends_are_preferred_then_clauses_then_spaces():
    first = "This is the first sentence of a fairly long paragraph."
    second = "Then comes another one, with a comma in the middle of it"
    assert split_text(f"{first} {second} and more words", 90) == [first, f"{second} and more words"]
    clause = "a clause that runs on for a while without stopping,"
    pieces = split_text(f"{clause} then keeps going on and on after the comma", 80)
    assert pieces[0] == clause
    # a comma in the first third would leave a stub: the last space is used instead
    pieces = split_text("Oh, " + unpunctuated(100), 60)
    assert len(pieces[0]) > 20 and pieces[0].startswith("Oh, ")


def test_sentence_end_inside_quotes_and_after_abbreviation_style_dots():
    text = 'He said "stop here." Then nothing else happened for a very long time indeed'
    assert split_text(text, 40)[0] == 'He said "stop here."'
    assert split_text("Wait... " + unpunctuated(60), 40)[0] == "Wait..."


def test_a_giant_word_is_hard_split():
    word = "x" * 1000
    pieces = split_text(f"before {word} after", 200)
    assert pieces[0] == "before"
    assert all(len(p) <= 200 for p in pieces)
    assert "".join(pieces[1:-1]) == word and pieces[-1] == "after"
    assert split_text("y" * 401, 200) == ["y" * 200, "y" * 200, "y"]


def test_hard_split_keeps_combining_marks_with_their_letter():
    word = "e\u0301" * 150  # é as e + COMBINING ACUTE ACCENT, 300 code points
    pieces = split_text(word, 101)
    assert "".join(pieces) == word
    assert all(not p.startswith("\u0301") for p in pieces) and all(len(p) <= 101 for p in pieces)


def test_default_bound_and_bad_bound():
    assert all(len(p) <= MAX_PIECE_CHARS for p in split_text(unpunctuated(1000)))
    try:
        split_text("abc", 0)
    except ValueError:
        pass
    else:
        raise AssertionError("max_chars 0 accepted")


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from(list("ab .,!?\n\u0301\u3002")), max_size=600),
       limit=st.integers(1, 120))
def test_pieces_are_bounded_and_keep_every_character(text: str, limit: int):
    pieces = split_text(text, limit)
    assert all(0 < len(p) <= limit and p == p.strip() for p in pieces)
    assert squeeze("".join(pieces)) == squeeze(text)


# ------------------------------------------------------------------ ClauseSplitter


def stream(splitter: ClauseSplitter, text: str, step: int = 3) -> list[str]:
    """Clauses from `text` pushed in small deltas, as an LLM streams it, then the flushed tail."""
    clauses: list[str] = []
    for i in range(0, len(text), step):
        clauses += splitter.push(text[i:i + step])
    tail = splitter.flush()
    return clauses + ([tail] if tail else [])


def test_clauses_cut_at_sentences_and_commas():
    clauses = stream(ClauseSplitter(), "Sure, here it is. The capital of France is Paris. Anything else? ")
    # the comma comes before first_min_chars (12), so the first clause runs to the sentence end
    assert clauses == ["Sure, here it is. ", "The capital of France is Paris. ", "Anything else? "]
    clauses = stream(ClauseSplitter(), "Well, as far as I know, the answer is yes and it always was")
    assert clauses == ["Well, as far as I know, ", "the answer is yes and it always was"]


def test_first_words_start_speech_before_the_first_clause_ends():
    text = "The capital of France is Paris and it has been for centuries. Anything else? "
    assert stream(ClauseSplitter(first_words=4), text) == [
        "The capital of France ", "is Paris and it has been for centuries. ", "Anything else? "]
    # Only the first piece: later ones still run to a sentence end (or a comma past min_chars).
    assert stream(ClauseSplitter(first_words=0), text) == [
        "The capital of France is Paris and it has been for centuries. ", "Anything else? "]
    # Punctuation that comes in time still wins, and a word is never cut before whitespace follows it.
    assert stream(ClauseSplitter(first_words=4), "Yes. The capital is Paris. ") == ["Yes. ", "The capital is Paris. "]
    splitter = ClauseSplitter(first_words=3)
    assert splitter.push("One two thr") == [] and splitter.push("ee") == []
    assert splitter.push(" four") == ["One two three "]


def test_first_words_need_first_min_chars():
    # Three tiny words are not enough text for a first piece: it takes words until 12 characters.
    assert stream(ClauseSplitter(first_words=3, first_min_chars=12), "I am ok and you are fine. ") == [
        "I am ok and you ", "are fine. "]


def test_clauses_without_punctuation_are_bounded_while_streaming():
    splitter = ClauseSplitter(max_chars=200)
    text = unpunctuated(4096)
    clauses: list[str] = []
    for i in range(0, len(text), 4):
        clauses += splitter.push(text[i:i + 4])
        assert len(splitter._buf) <= 200  # never more pending than one clause
    clauses.append(splitter.flush())
    assert all(len(c.strip()) <= 200 for c in clauses)
    assert len(clauses) >= 4096 // 200
    assert "".join(clauses) == text  # nothing lost, nothing reordered
    assert all(c.endswith(" ") for c in clauses[:-1])  # cut at word boundaries


def test_one_big_delta_is_cut_into_bounded_clauses_too():
    splitter = ClauseSplitter(max_chars=100)
    text = unpunctuated(300) + ", then a comma far beyond the limit. And a sentence end. "
    clauses = [*splitter.push(text), splitter.flush()]
    assert all(len(c.strip()) <= 100 for c in clauses)
    assert "".join(clauses) == text


def test_a_giant_word_is_hard_split_into_clauses():
    splitter = ClauseSplitter(max_chars=50)
    clauses = stream(splitter, "z" * 175)
    assert [len(c) for c in clauses] == [50, 50, 50, 25]


def test_leading_whitespace_does_not_stall_the_splitter():
    splitter = ClauseSplitter(max_chars=50)
    text = " " * 120 + unpunctuated(200)
    clauses = stream(splitter, text, step=10)
    assert len(clauses) >= 4 and all(len(c.strip()) <= 50 for c in clauses)
    assert "".join(clauses) == text


def test_a_later_sentence_end_is_used_when_the_first_is_too_short():
    splitter = ClauseSplitter(first_min_chars=100)
    assert splitter.push("A. Then a whole sentence here. More") == ["A. Then a whole sentence here. "]
