"""semantic_vad and noise_reduction in the engine, with stand-ins for the models.

The end-of-turn model is a scripted probability; VAD is the energy stand-in of test_voice_engine.
The real smart-turn model and suppressors are exercised in tests/integration and tests/e2e.
"""

from __future__ import annotations

import numpy as np

from openrealtime.engine import EngineContext, RealtimeSession
from openrealtime.engine.turns import (
    CHECK_AT_MS,
    EAGERNESS,
    SemanticTurnDetector,
    SilenceBegan,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TurnCheck,
    VadTurnDetector,
)

from .test_engine import ScriptedLLM, drain, send
from .test_voice_engine import EnergyVAD, FixedSTT, ToneTTS, append, quiet, tone

FRAME = 32


class ScriptedTurnModel:
    """P(complete) from a function of the judged audio's length (ms at 16 kHz)."""

    name = "scripted-turn"
    sample_rate = 16_000

    def __init__(self, prob=lambda ms: 0.9):
        self.prob = prob
        self.calls: list[int] = []

    async def predict(self, pcm16_16k: bytes) -> float:
        ms = len(pcm16_16k) // 32
        self.calls.append(ms)
        return self.prob(ms)


class HalvingStream:
    """A 'suppressor' that halves the amplitude (and counts what it saw)."""

    def __init__(self, kind: str, log: list):
        self.kind = kind
        self.log = log

    async def process(self, pcm16_16k: bytes) -> bytes:
        self.log.append((self.kind, len(pcm16_16k)))
        x = np.frombuffer(pcm16_16k, "<i2") // 2
        return x.astype("<i2").tobytes()

    def flush(self) -> bytes:
        return b""

    def reset(self) -> None:
        pass


class HalvingSuppressor:
    name = "halving"
    sample_rate = 16_000

    def __init__(self) -> None:
        self.log: list = []

    def new_stream(self, kind: str) -> HalvingStream:
        return HalvingStream(kind, self.log)


def session(model: ScriptedTurnModel | None, noise: HalvingSuppressor | None = None,
            stt: FixedSTT | None = None) -> RealtimeSession:
    async def resolve(name: str | None) -> ScriptedLLM:
        return ScriptedLLM(["Okay."])

    ctx = EngineContext(resolve_llm=resolve, default_model="m", default_instructions="Be brief.",
                        vad=EnergyVAD(), stt=stt or FixedSTT(), tts=ToneTTS(), turn_detector=model, noise=noise)
    return RealtimeSession(ctx, transport="websocket")


async def configure(s: RealtimeSession, turn_detection: dict | None, **audio_input) -> None:
    await send(s, {"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"model": "whisper-1"}, "turn_detection": turn_detection, **audio_input}}}})


def feed(d: VadTurnDetector, probs: list[float], start_frame: int = 0) -> list[tuple[int, object]]:
    out = []
    for i, p in enumerate(probs, start_frame):
        out += [(i, e) for e in d.feed(p, i * FRAME)]
    return out


# ---------------------------------------------------------------- the detector alone


def test_checks_at_each_pause_offset_and_commit_where_the_model_looked():
    d = SemanticTurnDetector("medium", FRAME)
    events = feed(d, [0.0] * 3 + [0.9] * 10 + [0.0] * 20)
    checks = [(i, e) for i, e in events if isinstance(e, TurnCheck)]
    speech_end = 13 * FRAME
    assert [e.first for _, e in checks] == [True, False]  # 200 and 500 ms into the pause (640 ms fed)
    assert [e.at_ms - speech_end for _, e in checks] == [224, 512]  # whole frames
    assert all(e.speech_end_ms == speech_end for _, e in checks)
    # Speculative STT starts first: at 100 ms of quiet (the default), before the first check; with
    # stt_speculate_ms 200, in the same frame as the check and ahead of it.
    [(began_at, _)] = [(i, e) for i, e in events if isinstance(e, SilenceBegan)]
    assert began_at < checks[0][0]
    late = feed(SemanticTurnDetector("medium", FRAME, speculate_ms=200), [0.0] * 3 + [0.9] * 10 + [0.0] * 20)
    first_check = next(i for i, e in late if isinstance(e, TurnCheck))
    first_frame = [e for i, e in late if i == first_check]
    assert isinstance(first_frame[0], SilenceBegan) and isinstance(first_frame[1], TurnCheck)
    # Below the first-check bar: keep waiting; above the re-check bar: the turn ends at that check.
    assert d.decide(checks[0][1], EAGERNESS["medium"].threshold - 0.01) == []
    assert d.decide(checks[1][1], EAGERNESS["medium"].recheck_threshold - 0.01) == []
    [stop] = d.decide(checks[1][1], EAGERNESS["medium"].recheck_threshold)
    assert stop == SpeechStopped(speech_end, checks[1][1].at_ms)
    assert not d.in_speech


def test_without_a_confident_answer_the_max_wait_ends_the_turn():
    for eagerness, wait in (("high", 2000), ("medium", 4000), ("auto", 4000), ("low", 8000)):
        d = SemanticTurnDetector(eagerness, FRAME)
        events = feed(d, [0.9] * 5 + [0.0] * (wait // FRAME + 2))
        checks = [e for _, e in events if isinstance(e, TurnCheck)]
        assert len(checks) == len([c for c in CHECK_AT_MS if c < wait])
        for c in checks:
            assert d.decide(c, 0.0) == []
        stops = [e for _, e in events if isinstance(e, SpeechStopped)]
        assert stops == [SpeechStopped(5 * FRAME, 5 * FRAME + wait)], eagerness


def test_a_check_is_stale_once_speech_resumes():
    d = SemanticTurnDetector("low", FRAME)
    events = feed(d, [0.9] * 5 + [0.0] * 8)
    [check] = [e for _, e in events if isinstance(e, TurnCheck)]
    events = feed(d, [0.9] * 3, start_frame=13)
    assert any(isinstance(e, SpeechResumed) for _, e in events)
    assert d.decide(check, 1.0) == []  # that pause is over
    assert d.in_speech
    events = feed(d, [0.0] * 8, start_frame=16)
    [check2] = [e for _, e in events if isinstance(e, TurnCheck)]
    assert check2.first and check2.speech_end_ms == 16 * FRAME
    assert d.decide(check2, 0.99) == [SpeechStopped(16 * FRAME, check2.at_ms)]


def test_switching_detectors_mid_turn_keeps_the_turn():
    vad = VadTurnDetector(0.5, 500, FRAME)
    assert [type(e) for _, e in feed(vad, [0.9] * 4)] == [SpeechStarted]
    sem = SemanticTurnDetector("high", FRAME)
    sem.adopt(vad)
    events = feed(sem, [0.9] * 2 + [0.0] * 10, start_frame=4)
    assert not any(isinstance(e, SpeechStarted) for _, e in events)  # no second start
    [check] = [e for _, e in events if isinstance(e, TurnCheck)]
    assert sem.decide(check, 0.5) == [SpeechStopped(6 * FRAME, check.at_ms)]


# ---------------------------------------------------------------- in a session


async def test_complete_turn_commits_at_the_first_pause_check():
    model = ScriptedTurnModel(lambda ms: 0.95)
    s = session(model)
    await s.start()
    await configure(s, {"type": "semantic_vad", "eagerness": "high"})
    await drain(s)
    await append(s, quiet(500) + tone(800) + quiet(600))
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert types[:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed"]
    started, stopped = events[0], events[1]
    assert started["item_id"] == stopped["item_id"] == events[2]["item_id"]
    # Decided ~200 ms into the pause, not after a silence window.
    assert 1300 + 150 <= stopped["audio_end_ms"] <= 1300 + 300
    assert model.calls and model.calls[0] >= 800  # the turn's audio up to the check
    completed = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert completed["item_id"] == stopped["item_id"]
    await s.close()


async def test_unfinished_turn_waits_and_the_continuation_joins_it():
    # "Complete" only once the turn holds more than ~1.5 s of audio (the second part arrived).
    model = ScriptedTurnModel(lambda ms: 0.95 if ms > 2200 else 0.05)
    stt = FixedSTT("one turn")
    s = session(model, stt=stt)
    await s.start()
    await configure(s, {"type": "semantic_vad", "eagerness": "medium"})
    await drain(s)
    await append(s, quiet(300) + tone(700) + quiet(1500))
    events = await drain(s)
    assert [e["type"] for e in events] == ["input_audio_buffer.speech_started"]
    item_id = events[0]["item_id"]
    await append(s, tone(600) + quiet(500))
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert types.count("input_audio_buffer.speech_started") == 0
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
    assert stopped["item_id"] == committed["item_id"] == item_id
    assert 3100 + 150 <= stopped["audio_end_ms"] <= 3100 + 300
    # One committed item holding both parts (about 300 ms padding + 700 + 1500 + 600 + 200 ms).
    assert len(s.input_audio[item_id]) // 32 >= 3000
    assert stt.calls[-1] // 32 >= 3000
    await s.close()


async def test_max_wait_holds_when_the_model_never_agrees():
    model = ScriptedTurnModel(lambda ms: 0.0)
    s = session(model)
    await s.start()
    await configure(s, {"type": "semantic_vad", "eagerness": "high", "create_response": False})
    await drain(s)
    await append(s, tone(600) + quiet(2600))
    events = await drain(s)
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    assert abs(stopped["audio_end_ms"] - (600 + 2000)) <= 64
    assert len(model.calls) == len(CHECK_AT_MS)  # the first check and the re-checks, all "not yet"
    assert "response.created" not in [e["type"] for e in events]
    await s.close()


async def test_switching_turn_detection_types_mid_session():
    model = ScriptedTurnModel(lambda ms: 0.95)
    s = session(model)
    await s.start()
    await drain(s)
    for td, end_after in (({"type": "server_vad", "silence_duration_ms": 700}, 700),
                          ({"type": "semantic_vad", "eagerness": "low"}, 224),
                          ({"type": "server_vad", "silence_duration_ms": 300}, 300),
                          ({"type": "semantic_vad", "eagerness": "high"}, 224)):
        await configure(s, {**td, "create_response": False})
        [updated] = await drain(s)
        assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == td["type"]
        base = s.input.total_ms
        await append(s, tone(500) + quiet(1000))
        events = await drain(s)
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
        assert abs(stopped["audio_end_ms"] - (base + 500 + end_after)) <= 64, td
    # Off: no turn events at all; back on semantic_vad: turns again.
    await configure(s, None)
    await drain(s)
    await append(s, tone(500) + quiet(1000))
    assert not [e for e in await drain(s) if "speech" in e["type"]]
    await configure(s, {"type": "semantic_vad", "create_response": False})
    await drain(s)
    await append(s, tone(500) + quiet(1000))
    assert "input_audio_buffer.committed" in [e["type"] for e in await drain(s)]
    await s.close()


async def test_switching_types_in_the_middle_of_speech_keeps_one_turn():
    model = ScriptedTurnModel(lambda ms: 0.95)
    s = session(model)
    await s.start()
    await configure(s, {"type": "server_vad", "silence_duration_ms": 500, "create_response": False})
    await drain(s)
    await append(s, tone(400))
    [started] = await drain(s)
    await configure(s, {"type": "semantic_vad", "eagerness": "high", "create_response": False})
    await drain(s)
    await append(s, tone(300) + quiet(600))
    events = await drain(s)
    assert [e["type"] for e in events][:2] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    assert events[0]["item_id"] == started["item_id"]
    await s.close()


async def test_semantic_vad_without_a_model_falls_back_to_silence_waits():
    s = session(None)
    await s.start()
    await configure(s, {"type": "semantic_vad", "eagerness": "high", "create_response": False})
    await drain(s)
    await append(s, tone(500) + quiet(1000))
    stopped = next(e for e in await drain(s) if e["type"] == "input_audio_buffer.speech_stopped")
    assert abs(stopped["audio_end_ms"] - (500 + 500)) <= 64
    await s.close()


async def test_noise_reduction_runs_before_vad_and_follows_session_update():
    noise = HalvingSuppressor()
    s = session(ScriptedTurnModel(), noise=noise)
    await s.start()
    await configure(s, {"type": "server_vad", "silence_duration_ms": 300, "create_response": False})
    await drain(s)
    assert noise.log == []  # off by default
    await configure(s, {"type": "server_vad", "silence_duration_ms": 300, "create_response": False},
                    noise_reduction={"type": "far_field"})
    [updated] = await drain(s)
    assert updated["session"]["audio"]["input"]["noise_reduction"] == {"type": "far_field"}
    # Halving 8000 -> 4000 amplitude: the energy VAD (mean |x| > 1000) still hears the tone.
    await append(s, tone(500) + quiet(500))
    assert "input_audio_buffer.committed" in [e["type"] for e in await drain(s)]
    assert {k for k, _ in noise.log} == {"far_field"}
    committed = s.input_audio[next(iter(s.input_audio))]
    assert np.abs(np.frombuffer(committed, "<i2")).max() <= 4001  # the buffer holds suppressed audio
    await configure(s, {"type": "server_vad", "silence_duration_ms": 300}, noise_reduction=None)
    await drain(s)
    n = len(noise.log)
    await append(s, quiet(200))
    assert len(noise.log) == n  # off again
    await s.close()
