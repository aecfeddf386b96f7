"""The near-field level gate: background talkers are not the caller.

A noise suppressor removes noise that does not sound like speech; it keeps speech, including the
speech of people in the background (babble), which Silero VAD rightly calls speech. With a
``near_field`` microphone (a headset, a phone at the ear) the caller is much louder than anyone
else in the room, so level separates the two where the spectrum cannot.

The gate tracks the background level as a low percentile of the recent input level (the way
minimum-statistics noise estimators do: pauses between the caller's words pull it down, and a
room full of talkers holds it at their level). A turn starts only where VAD hears speech
*and* the level stands well above that floor; inside a turn a smaller margin keeps the caller's
quieter syllables in, and background talk after the caller stops ends the turn as silence would.
The caller's own speech is kept out of the floor, so a long utterance does not raise it.

Pure logic over (probability, mean square) per VAD frame; see bench/noise_reduction.py for the
figures behind the margins (8-talker babble at 5-10 dB below the caller's speech: no false turns
and turns that end, where VAD alone sees one turn that never ends).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

# Background floor: this percentile of the smoothed level over the last WINDOW_MS.
WINDOW_MS = 4000
FLOOR_PERCENTILE = 20
# Level smoothing (a short average bridges the dips between syllables).
SMOOTH_MS = 96
# dB above the floor needed to start a turn, and to count as speech inside one. Dense babble's
# smoothed level stays within ~6-7 dB of its 20th percentile; a caller 5 dB above the babble sits
# ~9 dB above it on average.
START_MARGIN_DB = 10.0
KEEP_MARGIN_DB = 5.0


class NearFieldGate:
    """Turns VAD probabilities of audio at background level into 0 (see the module docstring)."""

    def __init__(self, frame_ms: float):
        self._recent: deque[float] = deque(maxlen=max(1, round(SMOOTH_MS / frame_ms)))
        self._levels: deque[float] = deque(maxlen=max(1, round(WINDOW_MS / frame_ms)))

    def reset(self) -> None:
        self._recent.clear()
        self._levels.clear()

    @property
    def floor_db(self) -> float | None:
        """The background level now (dB relative to one PCM16 step), or None before any audio."""
        return float(np.percentile(self._levels, FLOOR_PERCENTILE)) if self._levels else None

    def feed(self, prob: float, mean_square: float, in_speech: bool) -> float:
        """The probability the turn detector should see for this frame.

        ``mean_square`` is the frame's mean squared PCM16 sample; ``in_speech`` whether a turn is
        in progress (the detector's state before this frame).
        """
        self._recent.append(mean_square)
        level = 10.0 * math.log10(sum(self._recent) / len(self._recent) + 1.0)
        floor = self.floor_db
        above = 0.0 if floor is None else level - floor
        margin = KEEP_MARGIN_DB if in_speech else START_MARGIN_DB
        if not (in_speech and above >= KEEP_MARGIN_DB):  # the caller's speech stays out of the floor
            self._levels.append(level)
        return prob if above >= margin else 0.0
