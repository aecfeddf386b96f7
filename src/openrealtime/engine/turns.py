"""Turn detection on VAD probabilities: when the user starts and stops speaking.

Pure logic over (probability, frame) so it is exact and testable without audio or a clock;
the session maps frames to milliseconds of input audio.

``VadTurnDetector`` is server_vad: a fixed silence wait ends the turn. ``SemanticTurnDetector`` is
semantic_vad: the same VAD decides where speech pauses, and at each pause it asks an end-of-turn
model (``TurnCheck`` events; the caller runs the model and answers with ``decide``) whether the
words so far are a finished turn, committing as soon as the model is sure enough and always at the
eagerness' maximum wait.
"""

from __future__ import annotations

from dataclasses import dataclass

# Leaving speech needs the probability to fall this far below the threshold (hysteresis keeps
# a single quiet frame inside a word from ending the turn).
HYSTERESIS = 0.15
# Frames of speech in a row needed to start a turn (a click or a cough is one frame).
MIN_SPEECH_FRAMES = 2


@dataclass(slots=True)
class SpeechStarted:
    start_ms: int  # where speech was first heard


@dataclass(slots=True)
class SilenceBegan:
    """Speech may be over: a good moment to transcribe speculatively."""

    speech_end_ms: int


@dataclass(slots=True)
class SpeechResumed:
    """The pause was only a pause; drop speculative work."""


@dataclass(slots=True)
class SpeechStopped:
    speech_end_ms: int  # last frame with speech
    end_ms: int  # where the silence wait ended: speech_end_ms + silence_duration_ms


@dataclass(slots=True)
class TurnCheck:
    """Ask the end-of-turn model whether the turn is over, given its audio up to ``at_ms``.

    The caller answers with ``SemanticTurnDetector.decide(check, probability)``.
    """

    speech_end_ms: int  # the pause this check belongs to (last frame with speech)
    at_ms: int  # end of the audio to judge: where the turn ends if the model says it is complete
    first: bool  # the first check of this pause (later ones are re-checks as the silence grows)


TurnEvent = SpeechStarted | SilenceBegan | SpeechResumed | SpeechStopped | TurnCheck


# Quiet (ms) in a turn before its speculative transcript starts (the `stt_speculate_ms` default).
SPECULATE_AFTER_MS = 100


class VadTurnDetector:
    """server_vad semantics: `threshold`, and `silence_duration_ms` of quiet to end a turn."""

    def __init__(self, threshold: float, silence_duration_ms: int, frame_ms: float,
                 speculate_ms: float = SPECULATE_AFTER_MS):
        self.threshold = threshold
        self.silence_duration_ms = silence_duration_ms
        self.frame_ms = frame_ms
        # Quiet before SilenceBegan (at most half the silence wait); 0 = never speculate.
        self.speculate_ms = speculate_ms
        self.in_speech = False
        self._run = 0  # consecutive speech frames while idle
        self._run_start_ms = 0
        self._quiet_since: float | None = None
        self._speculated = False

    def reconfigure(self, threshold: float, silence_duration_ms: int) -> None:
        self.threshold = threshold
        self.silence_duration_ms = silence_duration_ms

    def reset(self) -> None:
        self.in_speech = False
        self._run = 0
        self._quiet_since = None
        self._speculated = False

    def adopt(self, other: VadTurnDetector) -> None:
        """Continue where ``other`` is (a session switched turn detection type mid-speech)."""
        self.in_speech = other.in_speech
        self._run = other._run
        self._run_start_ms = other._run_start_ms
        self._quiet_since = other._quiet_since
        self._speculated = other._speculated

    def _on_quiet(self, quiet_ms: float, frame_end_ms: float) -> list[TurnEvent]:
        """Hook called on every quiet frame inside a turn; server_vad has nothing to add."""
        return []

    def feed(self, prob: float, frame_start_ms: float) -> list[TurnEvent]:
        frame_end_ms = frame_start_ms + self.frame_ms
        events: list[TurnEvent] = []
        if not self.in_speech:
            if prob >= self.threshold:
                if self._run == 0:
                    self._run_start_ms = int(frame_start_ms)
                self._run += 1
                if self._run >= MIN_SPEECH_FRAMES:
                    self.in_speech = True
                    self._quiet_since = None
                    events.append(SpeechStarted(self._run_start_ms))
            else:
                self._run = 0
            return events
        if prob >= self.threshold - HYSTERESIS:
            if self._quiet_since is not None and self._speculated:
                events.append(SpeechResumed())
            self._quiet_since = None
            self._speculated = False
            return events
        if self._quiet_since is None:
            self._quiet_since = frame_start_ms
        quiet_ms = frame_end_ms - self._quiet_since
        # Speculate once the pause is long enough to be more than a gap between words.
        if (not self._speculated and self.speculate_ms > 0
                and quiet_ms >= min(self.speculate_ms, self.silence_duration_ms / 2)):
            self._speculated = True
            events.append(SilenceBegan(int(self._quiet_since)))
        # After SilenceBegan: speculative STT starts before an end-of-turn check, so a turn the model
        # ends at once is already being transcribed.
        events += self._on_quiet(quiet_ms, frame_end_ms)
        if quiet_ms >= self.silence_duration_ms:
            speech_end = int(self._quiet_since)
            self.reset()
            events.append(SpeechStopped(speech_end, speech_end + self.silence_duration_ms))
        return events


# ---------------------------------------------------------------- semantic_vad


@dataclass(frozen=True, slots=True)
class Eagerness:
    threshold: float  # P(complete) needed at the first check of a pause (~200 ms of quiet)
    recheck_threshold: float  # P(complete) needed at the re-checks, as the silence grows
    max_wait_ms: int  # silence after which the turn ends whatever the model says


# Tuned on Piper-synthesized speech: 24 finished sentences and 20 sentences cut at a mid-sentence
# pause (a comma, where Piper keeps a continuing intonation). At ~200 ms of quiet 22/24 finished
# ones scored >= 0.6 (most 0.9+; "No, I don't think so." scored 0.02), and the cut ones split into
# 11/20 below 0.15 and 9/20 at 0.7-0.96 (where Piper's intonation already fell, so the audio itself
# sounds finished: smart-turn hears prosody, not grammar). So the first-check thresholds mostly
# decide borderline cases. The probability creeps up with trailing silence whatever was said (cut
# sentences reach 0.5-0.9 after ~1 s), so re-checks need a stricter bar; they rescue finished
# sentences that scored low at first ("Yes, that sounds good." 0.54 -> 0.94 at 600 ms).
# Maximum waits are the OpenAI documentation's: 8 s / 4 s / 2 s.
EAGERNESS: dict[str, Eagerness] = {
    "high": Eagerness(0.3, 0.8, 2000),
    "medium": Eagerness(0.5, 0.9, 4000),
    "auto": Eagerness(0.5, 0.9, 4000),
    "low": Eagerness(0.7, 0.95, 8000),
}
# Quiet (ms) at which the model is consulted in a pause: the first check, then re-checks. Later in
# a pause the model mostly measures the silence, which the maximum wait already covers.
CHECK_AT_MS = (200, 500, 1000)


class SemanticTurnDetector(VadTurnDetector):
    """semantic_vad: VAD pauses + an end-of-turn model (see the module docstring).

    ``feed`` emits ``TurnCheck`` when a pause reaches each of ``CHECK_AT_MS``; the caller runs the
    model on the turn's audio up to ``check.at_ms`` and passes the probability to ``decide``, which
    returns ``[SpeechStopped]`` (with ``end_ms = check.at_ms``) if the turn is over. Without an
    answer the turn ends after ``max_wait_ms`` of silence, exactly like server_vad.
    """

    def __init__(self, eagerness: str, frame_ms: float, vad_threshold: float = 0.5,
                 speculate_ms: float = SPECULATE_AFTER_MS):
        self.eagerness = EAGERNESS[eagerness]
        super().__init__(vad_threshold, self.eagerness.max_wait_ms, frame_ms, speculate_ms)
        self._checks_due = 0  # index into CHECK_AT_MS for the current pause
        self._check_pause: float | None = None
        self.last_probability: float | None = None

    def reconfigure_eagerness(self, eagerness: str) -> None:
        self.eagerness = EAGERNESS[eagerness]
        self.silence_duration_ms = self.eagerness.max_wait_ms

    def _on_quiet(self, quiet_ms: float, frame_end_ms: float) -> list[TurnEvent]:
        if self._check_pause != self._quiet_since:  # a new pause
            self._check_pause = self._quiet_since
            self._checks_due = 0
        due = self._checks_due
        while self._checks_due < len(CHECK_AT_MS) and quiet_ms >= CHECK_AT_MS[self._checks_due]:
            self._checks_due += 1
        if self._checks_due == due or quiet_ms >= self.silence_duration_ms:
            return []
        # One check per frame even if several offsets passed at once (a late switch to semantic_vad).
        return [TurnCheck(int(self._quiet_since or 0), int(frame_end_ms), first=due == 0)]

    def decide(self, check: TurnCheck, probability: float) -> list[TurnEvent]:
        """The model's P(complete) for ``check``; a stale check (speech resumed since) is ignored."""
        if not self.in_speech or self._quiet_since is None or int(self._quiet_since) != check.speech_end_ms:
            return []
        self.last_probability = probability
        bar = self.eagerness.threshold if check.first else self.eagerness.recheck_threshold
        if probability < bar:
            return []
        self.reset()
        return [SpeechStopped(check.speech_end_ms, check.at_ms)]
