"""Turn detection on VAD probabilities: when the user starts and stops speaking.

Pure logic over (probability, frame) so it is exact and testable without audio or a clock;
the session maps frames to milliseconds of input audio.
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


TurnEvent = SpeechStarted | SilenceBegan | SpeechResumed | SpeechStopped


class VadTurnDetector:
    """server_vad semantics: `threshold`, and `silence_duration_ms` of quiet to end a turn."""

    def __init__(self, threshold: float, silence_duration_ms: int, frame_ms: float):
        self.threshold = threshold
        self.silence_duration_ms = silence_duration_ms
        self.frame_ms = frame_ms
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
        if not self._speculated and quiet_ms >= min(200.0, self.silence_duration_ms / 2):
            self._speculated = True
            events.append(SilenceBegan(int(self._quiet_since)))
        if quiet_ms >= self.silence_duration_ms:
            speech_end = int(self._quiet_since)
            self.reset()
            events.append(SpeechStopped(speech_end, speech_end + self.silence_duration_ms))
        return events
