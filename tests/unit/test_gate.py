"""The near-field level gate on made-up levels: background talk is held back, the caller is not."""

from __future__ import annotations

import numpy as np

from openrealtime.engine.gate import NearFieldGate
from openrealtime.engine.turns import SpeechStarted, SpeechStopped, VadTurnDetector

FRAME_MS = 32.0


def ms_of(db: float) -> float:
    """Mean square of a frame at ``db`` (dB relative to one PCM16 step)."""
    return 10 ** (db / 10)


def run(levels_db: list[float], probs: list[float]) -> list[tuple[str, int]]:
    """Events of server_vad (500 ms silence) on the gated probabilities."""
    gate = NearFieldGate(FRAME_MS)
    detector = VadTurnDetector(0.5, 500, FRAME_MS)
    events: list[tuple[str, int]] = []
    for i, (db, p) in enumerate(zip(levels_db, probs, strict=True)):
        for e in detector.feed(gate.feed(p, ms_of(db), detector.in_speech), i * FRAME_MS):
            if isinstance(e, SpeechStarted):
                events.append(("started", e.start_ms))
            elif isinstance(e, SpeechStopped):
                events.append(("stopped", e.speech_end_ms))
    return events


def babble_levels(n: int, seed: int = 0, db: float = 65.0) -> list[float]:
    """A room of talkers: a level that wanders a few dB around ``db``."""
    rng = np.random.default_rng(seed)
    return list(db + np.clip(rng.normal(0, 2.0, n), -5, 5))


def test_background_talk_never_starts_a_turn() -> None:
    n = 30 * 31  # 30 s
    assert run(babble_levels(n), [0.95] * n) == []
    # Without the gate, VAD alone makes it one endless turn.
    detector = VadTurnDetector(0.5, 500, FRAME_MS)
    assert sum(isinstance(e, SpeechStarted) for i in range(n) for e in detector.feed(0.95, i * FRAME_MS)) == 1


def test_caller_over_background_talk_starts_and_ends_a_turn() -> None:
    before, speech, after = 60, 60, 60  # ~2 s each
    levels = babble_levels(before) + babble_levels(speech, 1, db=75.0) + babble_levels(after, 2)
    events = run(levels, [0.95] * len(levels))
    assert [k for k, _ in events] == ["started", "stopped"], events
    assert abs(events[0][1] - before * FRAME_MS) <= 2 * FRAME_MS
    assert abs(events[1][1] - (before + speech) * FRAME_MS) <= 4 * FRAME_MS


def test_quiet_room_passes_everything_vad_hears() -> None:
    levels = [20.0] * 30 + [70.0] * 40 + [20.0] * 30
    probs = [0.0] * 30 + [0.9] * 40 + [0.0] * 30
    assert [k for k, _ in run(levels, probs)] == ["started", "stopped"]


def test_caller_speaking_first_thing_is_heard() -> None:
    """No quiet before the speech: the floor comes from the speech's own quieter frames."""
    words = [74.0, 78.0, 76.0, 75.0, 72.0, 70.0, 45.0, 40.0, 42.0] * 7  # words, then a gap
    levels = words + [20.0] * 30
    probs = [0.9] * len(words) + [0.0] * 30
    assert [k for k, _ in run(levels, probs)] == ["started", "stopped"]


def test_long_utterance_does_not_raise_the_floor_into_itself() -> None:
    """12 s of speech with softer stretches stays one turn: the caller's frames stay out of the floor."""
    rng = np.random.default_rng(4)
    speech = list(72 + 6 * np.sin(np.arange(375) * 0.3) + rng.normal(0, 1, 375))
    levels = [30.0] * 20 + speech + [30.0] * 30
    probs = [0.0] * 20 + [0.9] * 375 + [0.0] * 30
    assert [k for k, _ in run(levels, probs)] == ["started", "stopped"]


def test_floor_follows_the_room() -> None:
    gate = NearFieldGate(FRAME_MS)
    assert gate.floor_db is None
    for db in babble_levels(200):
        gate.feed(0.0, ms_of(db), False)
    assert 60 < (gate.floor_db or 0) < 65
    for _ in range(200):  # the talkers leave
        gate.feed(0.0, ms_of(20.0), False)
    assert (gate.floor_db or 99) < 25
    gate.reset()
    assert gate.floor_db is None
