"""api/admission.py (the session counter and the drain) and startup.Readiness (what /readyz reports)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from types import SimpleNamespace

import pytest

from openrealtime.api import admission as admission_module
from openrealtime.api.admission import Admission, readiness_response
from openrealtime.api.errors import APIError
from openrealtime.startup import Readiness, warm_start


def refusal(admission: Admission) -> APIError:
    with pytest.raises(APIError) as exc:
        admission.reserve("websocket")
    return exc.value


def test_unlimited_by_default():
    admission = Admission()
    slots = [admission.reserve("websocket") for _ in range(1000)]
    assert admission.active == 1000
    for slot in slots:
        slot.release()
    assert admission.active == 0


def test_the_limit_refuses_with_429_in_the_openai_shape_and_a_release_frees_a_slot():
    admission = Admission(2, retry_after_s=7)
    first = admission.reserve("websocket")
    admission.reserve("webrtc")  # both transports share the count
    error = refusal(admission)
    assert (error.status, error.type, error.code, error.param) == (429, "rate_limit_error", "session_limit_reached",
                                                                   None)
    assert error.headers == {"Retry-After": "7"}
    assert "2 concurrent" in error.message
    assert refusal(admission).code == "session_limit_reached"  # still full
    first.release()
    assert admission.reserve("webrtc") is not None
    assert admission.active == 2


def test_release_is_idempotent_so_a_double_release_cannot_free_another_sessions_slot():
    admission = Admission(2)
    a = admission.reserve("webrtc")
    admission.reserve("websocket")
    a.release()
    a.release()  # e.g. the route's error path and Call._close both release
    assert a.released and admission.active == 1
    admission.reserve("websocket")
    assert refusal(admission).status == 429


def test_zero_refuses_everything_and_negative_is_an_error():
    assert refusal(Admission(0)).status == 429
    with pytest.raises(ValueError):
        Admission(-1)


def test_draining_refuses_with_503_even_below_the_limit():
    admission = Admission(10)
    admission.draining = True
    error = refusal(admission)
    assert (error.status, error.type, error.code) == (503, "server_error", "draining")
    assert error.headers is not None and error.headers["Retry-After"].isdigit()


def test_limit_is_logged_once_per_time_it_is_hit(caplog: pytest.LogCaptureFixture):
    admission = Admission(1)
    slot = admission.reserve("websocket")
    for _ in range(5):
        refusal(admission)
    assert caplog.text.count("Refusing new sessions") == 1
    slot.release()
    admission.reserve("websocket")
    refusal(admission)
    assert caplog.text.count("Refusing new sessions") == 2


async def test_racing_sessions_never_exceed_the_limit_and_all_slots_come_back():
    admission = Admission(3)
    live = peak = refused = 0

    async def session() -> None:
        nonlocal live, peak, refused
        await asyncio.sleep(random.random() / 100)
        try:
            slot = admission.reserve("websocket")
        except APIError:
            refused += 1
            return
        live += 1
        peak = max(peak, live)
        try:
            await asyncio.sleep(random.random() / 50)
            if random.random() < 0.3:
                raise ConnectionError("the client went away")
        finally:
            live -= 1
            slot.release()

    await asyncio.gather(*(session() for _ in range(200)), return_exceptions=True)
    assert peak == 3 and refused > 0
    assert admission.active == 0


async def test_drain_without_sessions_returns_at_once():
    admission = Admission()
    t0 = time.monotonic()
    await admission.drain(30)
    assert admission.draining and time.monotonic() - t0 < 0.5


async def test_drain_waits_for_live_sessions_to_end_within_the_grace_period():
    admission = Admission()
    slot = admission.reserve("websocket")
    closed: list[str] = []

    async def closer() -> None:
        closed.append("closed")

    slot.closer = closer
    asyncio.get_running_loop().call_later(0.3, slot.release)
    t0 = time.monotonic()
    await admission.drain(10)
    assert 0.25 < time.monotonic() - t0 < 2
    assert closed == []  # it ended by itself: nobody closed it


async def test_drain_closes_what_is_left_after_the_grace_period():
    admission = Admission()
    slots = [admission.reserve("websocket"), admission.reserve("webrtc")]
    closed: list[str] = []
    for slot in slots:
        async def closer(slot=slot) -> None:
            await asyncio.sleep(0.05)  # a teardown takes a moment
            closed.append(slot.kind)
            slot.release()
        slot.closer = closer
    t0 = time.monotonic()
    await admission.drain(0.4)
    assert 0.35 < time.monotonic() - t0 < 2
    assert sorted(closed) == ["webrtc", "websocket"] and admission.active == 0
    assert refusal(admission).code == "draining"


async def test_hurry_cuts_the_grace_period_short():
    admission = Admission()
    slot = admission.reserve("websocket")

    async def closer() -> None:
        slot.release()

    slot.closer = closer
    hurry = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, hurry.set)
    t0 = time.monotonic()
    await admission.drain(30, hurry)
    assert time.monotonic() - t0 < 2 and admission.active == 0


async def test_a_session_that_will_not_close_does_not_hold_the_drain(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(admission_module, "CLOSE_TIMEOUT_S", 0.3)
    admission = Admission()
    stuck = admission.reserve("webrtc")  # still negotiating: no closer yet
    failing = admission.reserve("websocket")

    async def broken() -> None:
        raise RuntimeError("already closed")

    failing.closer = broken
    t0 = time.monotonic()
    await admission.drain(0.1)
    assert time.monotonic() - t0 < 2
    assert admission.active == 2 and not stuck.released
    assert "still open" in caplog.text


# ------------------------------------------------------------------ readiness


def body(response) -> dict:
    return json.loads(response.body)


def test_readiness_response_for_each_state():
    admission, readiness = Admission(), Readiness()
    ready = readiness_response(admission, readiness)
    assert (ready.status_code, body(ready)) == (200, {"status": "ready"})

    readiness.begin(["LLM smollm2-135m", "STT whisper-tiny.en"])
    readiness.loaded("STT whisper-tiny.en")
    loading = readiness_response(admission, readiness)
    assert loading.status_code == 503
    assert body(loading)["error"] == {"type": "server_error", "code": "not_ready", "param": None,
                                      "message": "Still loading LLM smollm2-135m."}
    assert body(loading)["loading"] == ["LLM smollm2-135m"] and body(loading)["failed"] == []

    readiness.loaded("LLM smollm2-135m")
    readiness.finish()
    assert readiness_response(admission, readiness).status_code == 200

    admission.draining = True
    draining = readiness_response(admission, readiness)
    assert draining.status_code == 503 and body(draining)["error"]["code"] == "draining"


def test_a_failed_or_interrupted_warm_start_is_not_ready():
    readiness = Readiness()
    readiness.begin(["LLM x", "TTS piper", "VAD silero"])
    readiness.loaded("LLM x", ok=False)
    readiness.loaded("VAD silero")
    readiness.finish()  # stopped before TTS loaded
    assert not readiness.ready and readiness.failed == ["LLM x", "TTS piper"]
    response = readiness_response(Admission(), readiness)
    assert response.status_code == 503 and body(response)["error"]["code"] == "not_ready"
    assert "LLM x, TTS piper" in body(response)["error"]["message"]


class _Backend:
    def __init__(self, name: str, delay: float, fail: bool = False) -> None:
        self.name, self.delay, self.fail = name, delay, fail

    async def warmup(self) -> None:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("corrupt model file")


def _app(*backends: _Backend) -> SimpleNamespace:
    vad, stt = [*backends, None, None][:2]
    llm = SimpleNamespace(remote_route=lambda _: "remote", default_model="remote/x")  # a remote LLM: not warmed
    speech = SimpleNamespace(vad=vad, stt=stt, tts=None, turn=None, noise=None)
    return SimpleNamespace(state=SimpleNamespace(llm=llm, speech=speech, readiness=Readiness(),
                                                 settings=SimpleNamespace(default_instructions="", llm_model="x")))


async def test_warm_start_reports_what_is_loading_until_it_is_done():
    app = _app(_Backend("fast", 0.05), _Backend("slow", 0.4))
    readiness = app.state.readiness
    task = asyncio.create_task(warm_start(app))
    await asyncio.sleep(0.2)
    assert not readiness.ready and readiness.loading == ["STT slow"]
    assert await task is True
    assert readiness.ready and readiness.loading == [] and readiness.failed == []


async def test_warm_start_failure_keeps_the_node_unready():
    app = _app(_Backend("ok", 0.01), _Backend("broken", 0.01, fail=True))
    assert await warm_start(app) is False
    assert not app.state.readiness.ready and app.state.readiness.failed == ["STT broken"]


async def test_warm_start_with_nothing_to_load_is_ready():
    app = _app()
    app.state.readiness.begin(())  # what the lifespan does before the warm start runs
    assert not app.state.readiness.ready
    assert await warm_start(app) is True
    assert app.state.readiness.ready


# --- the queue-time bound ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_queue_waits_are_the_worst_queues_recent_median():
    from openrealtime.telemetry import QueueWaits

    clock = Clock()
    waits = QueueWaits(window_s=10, clock=clock)
    assert waits.level() == (None, 0.0)
    for seconds in (0.0, 0.0, 0.1):  # the LLM keeps up
        waits.observe("llm", seconds)
    for seconds in (0.0, 0.5, 1.0, 1.5, 2.0):  # five transcripts of turns that ended together
        waits.observe("stt", seconds)
    assert waits.levels() == {"llm": 0.0, "stt": 1.0}
    assert waits.level() == ("stt", 1.0)
    clock.now += 6
    for _ in range(6):  # the backlog is gone: new requests start at once
        waits.observe("stt", 0.0)
    assert waits.levels() == {"llm": 0.0, "stt": 0.0}
    clock.now += 10.5  # nothing reported in the window: quiet
    assert waits.levels() == {} and waits.level() == (None, 0.0)
    waits.observe("tts", -1.0)  # a clock step backwards never counts as negative
    assert waits.levels() == {"tts": 0.0}


def test_the_queue_time_bound_refuses_new_sessions_while_work_waits_too_long(caplog: pytest.LogCaptureFixture):
    from openrealtime.telemetry import QueueWaits

    clock = Clock()
    waits = QueueWaits(window_s=10, clock=clock)
    admission = Admission(max_queue_wait_s=0.5, queue_waits=waits, retry_after_s=3)
    live = admission.reserve("webrtc")  # quiet: admitted
    waits.observe("stt", 0.4)
    admission.reserve("websocket")  # below the bound
    waits.observe("stt", 1.2)
    waits.observe("stt", 0.9)  # median 0.9 s
    error = refusal(admission)
    assert (error.status, error.type, error.code, error.param) == (429, "rate_limit_error", "session_limit_reached",
                                                                   None)
    assert error.headers == {"Retry-After": "3"}
    assert "stt" in error.message and "900 ms" in error.message and "500 ms" in error.message
    assert admission.active == 2 and not live.released  # live sessions are untouched
    for _ in range(5):
        refusal(admission)
    clock.now += 11  # the congestion is over
    assert admission.reserve("websocket") is not None
    waits.observe("llm", 2.0)
    refusal(admission)
    logged = [r.getMessage() for r in caplog.records if "Refusing new sessions" in r.getMessage()]
    assert len(logged) == 2 and "stt work waits 900 ms" in logged[0] and "llm" in logged[1], logged
    with pytest.raises(ValueError):
        Admission(max_queue_wait_s=0)


def test_the_queue_time_bound_is_off_by_default():
    from openrealtime.telemetry import QueueWaits

    waits = QueueWaits(window_s=10)
    waits.observe("llm", 60.0)
    assert Admission(queue_waits=waits).reserve("websocket") is not None
