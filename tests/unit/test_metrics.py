"""GET /metrics: engine/stats.py counters, the telemetry registry, and their exposition (api/metrics.py).

The telemetry metrics are process-wide, so these tests compare before and after rather than
expecting absolute values.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from openrealtime import telemetry
from openrealtime.api.admission import Admission
from openrealtime.api.errors import APIError
from openrealtime.api.metrics import ProcessSample, render, sample_process
from openrealtime.audio.player import FRAME_SAMPLES, RATE, PacedAudioTrack
from openrealtime.engine.stats import ArrivalClock, EngineStats, observe_turn
from openrealtime.protocol import events as ev
from tests.metrics_text import parse, total, value

from .test_engine import ScriptedLLM, drain, make_session, send, user_text
from .test_voice_engine import append, quiet, tone, voice_session


def _error(code: str | None) -> ev.ErrorEvent:
    return ev.ErrorEvent(error=ev.ErrorDetail(type="invalid_request_error", code=code, message="m"))


def scrape() -> dict:
    """The exposition as the route renders it, parsed."""
    return parse(render(EngineStats(), ProcessSample(None, None, None), asyncio_tasks=1, webrtc_calls=0))


def stage_count(samples: dict, stage: str, since: str, transport: str) -> float:
    return value(samples, "openrealtime_turn_stage_seconds_count", stage=stage, since=since, transport=transport)


def test_sessions_are_tracked_by_id_and_never_go_negative():
    stats = EngineStats()
    stats.session_started("a", "websocket")
    stats.session_started("a", "websocket")  # started twice: still one session
    stats.session_started("b", "webrtc")
    stats.session_ended("never-started", "websocket")
    assert (stats.sessions_active("websocket"), stats.sessions_active("webrtc")) == (1, 1)
    stats.session_ended("a", "websocket")
    stats.session_ended("a", "websocket")
    assert stats.sessions_active("websocket") == 0
    assert stats.sessions_started["websocket"] == 1


def test_render_is_valid_exposition_with_every_series():
    stats = EngineStats()
    stats.session_started("a", "websocket")
    for _ in range(3):
        stats.event_received()
    stats.event_sent(_error("item_not_found"))
    stats.event_sent(_error("item_not_found"))
    stats.event_sent(_error(None))
    stats.event_sent(_error('we"ird\\co\nde'))  # label values are escaped
    stats.event_sent(ev.InputAudioBufferCleared())  # not an error: not counted
    stats.response_done("completed")
    stats.response_done("cancelled")
    stats.response_done("cancelled")
    text = render(stats, ProcessSample(1024, 9, 4), asyncio_tasks=7, webrtc_calls=2)
    samples = parse(text)
    assert value(samples, "openrealtime_process_resident_memory_bytes") == 1024
    assert value(samples, "openrealtime_process_open_fds") == 9
    assert value(samples, "openrealtime_process_threads") == 4
    assert value(samples, "openrealtime_asyncio_tasks") == 7
    assert value(samples, "openrealtime_webrtc_calls_active") == 2
    assert value(samples, "openrealtime_sessions_active", transport="websocket") == 1
    assert ("openrealtime_sessions_active", (("transport", "webrtc"),)) in samples  # present at 0
    assert value(samples, "openrealtime_sessions_total", transport="websocket") == 1
    assert value(samples, "openrealtime_events_received_total") == 3
    assert value(samples, "openrealtime_errors_sent_total", code="item_not_found") == 2
    assert value(samples, "openrealtime_errors_sent_total", code="none") == 1
    assert value(samples, "openrealtime_errors_sent_total", code='we"ird\\co\nde') == 1
    assert total(samples, "openrealtime_errors_sent_total") == 4
    assert value(samples, "openrealtime_responses_total", status="cancelled") == 2
    assert value(samples, "openrealtime_responses_total", status="completed") == 1
    assert ("openrealtime_responses_total", (("status", "failed"),)) in samples  # present at 0
    assert "# TYPE openrealtime_responses_total counter" in text
    assert "# TYPE openrealtime_sessions_active gauge" in text
    # The telemetry registry follows in the same exposition: series that exist before any event ...
    for reason in ("session_limit_reached", "draining"):
        assert ("openrealtime_sessions_refused_total", (("reason", reason),)) in samples
    assert ("openrealtime_audio_frames_late_total", (("transport", "webrtc"),)) in samples
    assert ("openrealtime_audio_frames_dropped_total", (("transport", "webrtc"),)) in samples
    # ... and families declared for the LLM scheduler, with no `_created` series anywhere.
    for name, kind in (("openrealtime_llm_queue_wait_seconds", "histogram"),
                       ("openrealtime_llm_batch_sequences", "histogram"),
                       ("openrealtime_llm_tokens_total", "counter"),
                       ("openrealtime_llm_active_requests", "gauge"),
                       ("openrealtime_llm_waiting_requests", "gauge"),
                       ("openrealtime_llm_decode_seconds_total", "counter"),
                       ("openrealtime_turn_stage_seconds", "histogram"),
                       ("openrealtime_turns_total", "counter")):
        assert f"# TYPE {name} {kind}" in text
    assert not [name for name, _ in samples if name.endswith("_created")]


def test_unreadable_process_figures_are_left_out():
    text = render(EngineStats(), ProcessSample(None, None, None), asyncio_tasks=1, webrtc_calls=0)
    assert "openrealtime_process_" not in text
    parse(text)


def test_render_takes_another_registry():
    """The route's registry is a parameter: a test (or an embedding app) can render its own."""
    registry = CollectorRegistry()
    text = render(EngineStats(), ProcessSample(None, None, None), asyncio_tasks=1, webrtc_calls=0,
                  registry=registry)
    assert "openrealtime_llm_" not in text and "openrealtime_sessions_active" in text


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_sample_process_reads_this_process():
    gate = threading.Event()
    thread = threading.Thread(target=gate.wait)
    thread.start()
    try:
        sample = sample_process()
        assert sample.threads is not None and sample.threads >= 2
    finally:
        gate.set()
        thread.join()
    assert sample.resident_memory_bytes is not None and sample.resident_memory_bytes > 1024 * 1024
    assert sample.open_fds is not None and sample.open_fds >= 3


@pytest.mark.parametrize("bad", [
    "x 1\n",  # no TYPE
    "# TYPE x gauge\nx{a=\"1} 1\n",  # unterminated label
    "# TYPE x gauge\nx one\n",
    "# TYPE x gauge\nx 1",  # no final newline
    "# TYPE x gauge\nx 1\nx 2\n",
])
def test_the_reader_is_strict(bad: str):
    with pytest.raises(ValueError):
        parse(bad)


# ------------------------------------------------------------------ LLM serving metrics


def test_llm_metrics_are_observable_from_other_threads():
    """The llama.cpp compute thread observes them directly; the counts must add up exactly."""
    model = "test-threads"

    def work() -> None:
        for _ in range(500):
            telemetry.LLM_TOKENS.labels(model=model, kind="generated").inc()
            telemetry.LLM_BATCH_SIZE.labels(model=model).observe(3)
            telemetry.LLM_DECODE_SECONDS.labels(model=model).inc(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    telemetry.LLM_QUEUE_WAIT.labels(model=model).observe(0.03)
    telemetry.LLM_ACTIVE.labels(model=model).set(2)
    telemetry.LLM_WAITING.labels(model=model).inc()
    samples = scrape()
    assert value(samples, "openrealtime_llm_tokens_total", model=model, kind="generated") == 2000
    assert value(samples, "openrealtime_llm_batch_sequences_count", model=model) == 2000
    assert value(samples, "openrealtime_llm_batch_sequences_bucket", model=model, le="3.0") == 2000
    assert value(samples, "openrealtime_llm_batch_sequences_bucket", model=model, le="2.0") == 0
    assert value(samples, "openrealtime_llm_decode_seconds_total", model=model) == pytest.approx(2.0)
    assert value(samples, "openrealtime_llm_queue_wait_seconds_bucket", model=model, le="0.05") == 1
    assert value(samples, "openrealtime_llm_queue_wait_seconds_bucket", model=model, le="0.025") == 0
    assert value(samples, "openrealtime_llm_active_requests", model=model) == 2
    assert value(samples, "openrealtime_llm_waiting_requests", model=model) == 1


def test_the_registry_is_not_the_global_default():
    from prometheus_client import REGISTRY as DEFAULT

    assert telemetry.REGISTRY is not DEFAULT
    assert b"openrealtime_llm_tokens" not in generate_latest(DEFAULT)


# ------------------------------------------------------------------ turn stages


def test_observe_turn_times_stages_from_the_end_of_speech():
    before = scrape()
    marks = {"speech_end": 100.0, "speech_stopped": 100.5, "stt_done": 100.55, "response_created": 100.52,
             "prompt_ready": 100.56, "llm_first_token": 100.7, "first_clause": 100.9,
             "speculative_stt": 1.0}
    observe_turn(marks, "unit")
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    labels = {"since": "speech_end", "transport": "unit"}
    assert delta("openrealtime_turns_total", **labels) == 1
    for stage in ("speech_stopped", "stt_done", "prompt_ready", "llm_first_token", "first_clause"):
        assert delta("openrealtime_turn_stage_seconds_count", stage=stage, **labels) == 1, stage
    for stage in ("tts_first_chunk", "audio_out"):  # never reached: not observed as zero
        assert delta("openrealtime_turn_stage_seconds_count", stage=stage, **labels) == 0, stage
    assert delta("openrealtime_turn_stage_seconds_sum", stage="llm_first_token", **labels) == pytest.approx(0.7)
    # 0.7 s lands in the 0.8 bucket, not the 0.6 one
    assert delta("openrealtime_turn_stage_seconds_bucket", stage="llm_first_token", le="0.8", **labels) == 1
    assert delta("openrealtime_turn_stage_seconds_bucket", stage="llm_first_token", le="0.6", **labels) == 0


def test_observe_turn_without_speech_times_from_the_response():
    before = scrape()
    observe_turn({"response_created": 5.0, "prompt_ready": 5.01, "llm_first_token": 5.2}, "unit-text")
    after = scrape()
    labels = {"stage": "llm_first_token", "since": "response_created", "transport": "unit-text"}
    assert value(after, "openrealtime_turn_stage_seconds_count", **labels) == \
        value(before, "openrealtime_turn_stage_seconds_count", **labels) + 1
    assert value(after, "openrealtime_turn_stage_seconds_sum", **labels) == \
        pytest.approx(value(before, "openrealtime_turn_stage_seconds_sum", **labels) + 0.2)


async def test_a_spoken_turn_fills_every_stage_from_the_end_of_speech():
    llm = ScriptedLLM(["Hi ", "there, ", "friend. ", "How ", "are ", "you?"])
    s = voice_session(llm)
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    await drain(s)
    before = scrape()
    # Faster than real time (a file): the end of speech is dated by when its audio arrived.
    await append(s, quiet(500) + tone(800) + quiet(600))
    await drain(s, "response.done")
    await s.close()
    after = scrape()
    for stage in telemetry.TURN_STAGES:
        assert stage_count(after, stage, "speech_end", "websocket") == \
            stage_count(before, stage, "speech_end", "websocket") + 1, stage
    # Sent in one go, the turn was decided moments after its audio arrived, not 300 ms later.
    decided = value(after, "openrealtime_turn_stage_seconds_sum", stage="speech_stopped", since="speech_end",
                    transport="websocket") - \
        value(before, "openrealtime_turn_stage_seconds_sum", stage="speech_stopped", since="speech_end",
              transport="websocket")
    assert 0 <= decided < 0.25, decided


async def test_a_text_turn_counts_from_response_created():
    s = make_session(ScriptedLLM(["Hel", "lo", "!"]))
    await s.start()
    await drain(s)
    before = scrape()
    await send(s, user_text("Hi"))
    await send(s, {"type": "response.create", "response": {"output_modalities": ["text"]}})
    await drain(s, "response.done")
    await s.close()
    after = scrape()
    assert stage_count(after, "llm_first_token", "response_created", "websocket") == \
        stage_count(before, "llm_first_token", "response_created", "websocket") + 1
    assert value(after, "openrealtime_turns_total", since="response_created", transport="websocket") == \
        value(before, "openrealtime_turns_total", since="response_created", transport="websocket") + 1


def test_arrival_clock_dates_a_position_by_when_its_audio_arrived():
    clock = ArrivalClock(keep=4)
    assert clock.when(0) is None
    for i in range(1, 6):  # 100 ms appends in real time: position i*100 arrived at t=i/10
        clock.note(i * 100.0, i / 10)
    assert clock.when(450) == pytest.approx(0.45)  # captured in real time within its append
    assert clock.when(500) == pytest.approx(0.5)
    assert clock.when(501) is None  # not arrived yet
    burst = ArrivalClock()
    burst.note(100.0, 1.0)
    burst.note(5000.0, 1.001)  # 4.9 s of audio sent at once: it cannot have been spoken before 1.0
    assert burst.when(4000) == pytest.approx(1.0)


# ------------------------------------------------------------------ admission and pacing


def test_refused_sessions_are_counted_by_reason():
    before = scrape()
    admission = Admission(1)
    admission.reserve("websocket")
    for _ in range(2):
        with pytest.raises(APIError):
            admission.reserve("websocket")
    admission.draining = True
    with pytest.raises(APIError):
        admission.reserve("webrtc")
    after = scrape()
    for reason, n in (("session_limit_reached", 2), ("draining", 1)):
        assert value(after, "openrealtime_sessions_refused_total", reason=reason) == \
            value(before, "openrealtime_sessions_refused_total", reason=reason) + n, reason


async def test_late_and_dropped_frames_are_counted():
    late, dropped = (("openrealtime_audio_frames_late_total", {"transport": "webrtc"}),
                     ("openrealtime_audio_frames_dropped_total", {"transport": "webrtc"}))
    track = PacedAudioTrack()
    await track.recv()
    before = scrape()
    loop = asyncio.get_running_loop()
    for _ in range(3):  # on time (its slot 10 ms ahead, whatever the loop's own lag): counted nowhere
        track._start = loop.time() - track._pts / RATE + 0.01
        await track.recv()
    on_time = scrape()
    assert value(on_time, late[0], **late[1]) == value(before, late[0], **late[1])
    assert value(on_time, dropped[0], **dropped[1]) == value(before, dropped[0], **dropped[1])
    # The next frame's slot was 40 ms ago: more than a frame late, not late enough to skip.
    track._start = loop.time() - track._pts / RATE - 0.04
    await track.recv()
    was_late = scrape()
    assert value(was_late, late[0], **late[1]) == value(on_time, late[0], **late[1]) + 1
    assert value(was_late, dropped[0], **dropped[1]) == value(on_time, dropped[0], **dropped[1])
    # A 0.5 s stall: the track skips the ~25 slots it missed instead of bursting them.
    pts = track._pts
    track._start = loop.time() - pts / RATE - 0.5
    frame = await track.recv()
    skipped = (frame.pts - pts) // FRAME_SAMPLES
    stalled = scrape()
    assert 24 <= skipped <= 30, skipped
    assert value(stalled, dropped[0], **dropped[1]) == value(was_late, dropped[0], **dropped[1]) + skipped
    assert value(stalled, late[0], **late[1]) == value(was_late, late[0], **late[1])
    track.stop()
