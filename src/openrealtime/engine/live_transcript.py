"""Transcription deltas while the user is still speaking, that never have to be taken back.

Whisper is a batch model: the transcription session decodes the utterance so far again and again
(engine/transcription.py) and each decode is a fresh hypothesis of the whole utterance. Its last
words are unreliable (a word cut in half, a "." because the audio stops there, "the" that becomes
"The" with more context), so a word is sent only once two consecutive hypotheses agree on it and
on everything before it (the "local agreement" policy of streaming Whisper). Sent text is never
revised: at the end the final decode is aligned with what was sent and only its remainder becomes
the last delta, so the concatenated deltas always equal ``completed.transcript``.

Pure logic over word lists: no audio, no clock.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

# Punctuation that hypotheses of the same words disagree on ("dog," / "dog" / "dog.").
_PUNCTUATION = ".,!?;:-\u2026\"'()[]\u201c\u201d\u2018\u2019"
# A probability this small is "impossible"; log(0) is not a number the wire can carry.
_MIN_PROBABILITY = 1e-10


@dataclass(frozen=True, slots=True)
class Word:
    text: str  # as Whisper wrote it, without spaces ("Hello,")
    logprob: float | None = None  # natural log of the word's probability, if the STT gave one

    @property
    def key(self) -> str:
        """What two hypotheses must share to count as the same word: case and punctuation aside."""
        return self.text.casefold().strip(_PUNCTUATION) or self.text


def hypothesis(text: str, probabilities: list[tuple[str, float]] | None = None) -> list[Word]:
    """The words of one decode, each with the log probability the STT reported for it.

    The STT's word list can split a written word ("it-" comes as "it" and "-"): pieces are
    consumed while they spell the written word and their log probabilities add up (the
    probability of the whole word). A word nothing spells gets no log probability.
    """
    words = text.split()
    if probabilities is None:
        return [Word(w) for w in words]
    out: list[Word] = []
    i = 0
    for written in words:
        spelled, logprob = "", 0.0
        j = i
        while j < len(probabilities) and len(spelled) < len(written) \
                and written.startswith(spelled + probabilities[j][0]):
            spelled += probabilities[j][0]
            logprob += math.log(max(probabilities[j][1], _MIN_PROBABILITY))
            j += 1
        if spelled == written:
            out.append(Word(written, logprob))
            i = j
        else:  # written differently: assume it was one piece, and go on with the next
            out.append(Word(written))
            i += 1
    return out


def join(words: list[Word], first: bool) -> str:
    """The wire text of `words`: space-separated, with a leading space unless they start the transcript."""
    text = " ".join(w.text for w in words)
    return text if first or not text else " " + text


def logprob_entries(words: list[Word], first: bool) -> list[dict[str, object]]:
    """`LogProbProperties` for `words` ({token, logprob, bytes}); tokens spell `join(words, first)`.

    One entry per word (faster-whisper reports probabilities per word, not per BPE token); words
    without a probability are left out.
    """
    entries: list[dict[str, object]] = []
    for i, word in enumerate(words):
        if word.logprob is None:
            continue
        token = word.text if first and i == 0 else " " + word.text
        entries.append({"token": token, "logprob": round(word.logprob, 6), "bytes": list(token.encode())})
    return entries


class StableTranscript:
    """The text of one utterance sent so far, grown only by words two decodes agree on."""

    def __init__(self) -> None:
        self.sent: list[Word] = []
        self._previous: list[Word] | None = None

    @property
    def text(self) -> str:
        return join(self.sent, True)

    def update(self, words: list[Word]) -> list[Word]:
        """A new partial hypothesis; returns the words to send now (possibly none).

        Stable = the longest common prefix of this and the previous hypothesis, word by word
        written alike; a difference of case only ("the" / "The" once more context came) counts as
        agreement, written as this one writes it, but punctuation ("dog," / "dog", "lazy...") does
        not. Only a stable prefix that extends what was already sent grows it: a hypothesis that
        revises sent words waits for a later one.
        """
        previous, self._previous = self._previous, words
        if previous is None:
            return []
        agreed = 0
        while agreed < min(len(previous), len(words)) \
                and previous[agreed].text.casefold() == words[agreed].text.casefold():
            agreed += 1
        if agreed <= len(self.sent) or [w.key for w in words[:len(self.sent)]] != [w.key for w in self.sent]:
            return []
        new = words[len(self.sent):agreed]
        self.sent += new
        return new

    def finish(self, final: list[Word]) -> list[Word]:
        """The final decode of the whole utterance; returns the words of the last delta.

        The transcript is then `text`: what was sent, then the final decode after the point that
        matches the end of what was sent (found by aligning the two when the final decode
        revised a sent word).
        """
        n = len(self.sent)
        if [w.key for w in final[:n]] == [w.key for w in self.sent]:
            rest = final[n:]
        else:
            rest = final[_aligned_end(self.sent, final):]
        self.sent += rest
        self._previous = None
        return rest


def _aligned_end(sent: list[Word], final: list[Word]) -> int:
    """Index in `final` just after the words that correspond to `sent`.

    difflib aligns the word keys; sent words after the last match are taken to be revised into as
    many final words (a replaced word is not repeated).
    """
    matcher = difflib.SequenceMatcher(a=[w.key for w in sent], b=[w.key for w in final], autojunk=False)
    a_end = b_end = 0
    for block in matcher.get_matching_blocks():
        if block.size and block.a < len(sent):
            size = min(block.size, len(sent) - block.a)
            a_end, b_end = block.a + size, block.b + size
    return min(len(final), b_end + len(sent) - a_end)
