"""engine/stats.py counters and their Prometheus exposition (api/metrics.py)."""

from __future__ import annotations

import os
import threading

import pytest

from openrealtime.api.metrics import ProcessSample, render, sample_process
from openrealtime.engine.stats import EngineStats
from openrealtime.protocol import events as ev
from tests.metrics_text import parse, total, value


def _error(code: str | None) -> ev.ErrorEvent:
    return ev.ErrorEvent(error=ev.ErrorDetail(type="invalid_request_error", code=code, message="m"))


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


def test_unreadable_process_figures_are_left_out():
    text = render(EngineStats(), ProcessSample(None, None, None), asyncio_tasks=1, webrtc_calls=0)
    assert "openrealtime_process_" not in text
    parse(text)


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
