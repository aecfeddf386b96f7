"""`GET /metrics`: Prometheus text format (0.0.4), rendered by prometheus_client.

Two sources in one exposition: the process-wide metric objects of `openrealtime.telemetry.REGISTRY`
(turn stage latencies, refused sessions, paced-audio health, LLM serving), and `ServerCollector`,
which reads this app's state at scrape time (process figures from /proc, event-loop tasks, live
WebRTC calls, and the engine's session/response/error counts in engine/stats.py). The latter are
per app rather than registry objects, so every app in one process (tests) counts its own sessions.

The route takes the same API key as /v1/models, so session and error counts are not public on a
keyed server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from ..engine.stats import TRANSPORTS, EngineStats
from ..telemetry import QUEUE_WAITS, REGISTRY
from .auth import require_key

# 0.0.4, not prometheus_client's newer default (1.0.0): every Prometheus server reads it, and our
# metric names need none of 1.0.0's UTF-8 escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

router = APIRouter()


@dataclass(slots=True)
class ProcessSample:
    """What /proc says about this process; None where it cannot be read (not Linux)."""

    resident_memory_bytes: int | None
    open_fds: int | None
    threads: int | None


def sample_process(pid: int | str = "self") -> ProcessSample:
    """RSS, open file descriptors and OS threads (native ones too: llama.cpp, onnxruntime)."""
    rss = threads = fds = None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024  # reported in kB
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except OSError:
        pass
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return ProcessSample(rss, fds, threads)


class ServerCollector(Collector):
    """This app's figures as metric families, computed when scraped (nothing to keep in sync)."""

    def __init__(self, stats: EngineStats, process: ProcessSample, *, asyncio_tasks: int,
                 webrtc_calls: int) -> None:
        self.stats = stats
        self.process = process
        self.asyncio_tasks = asyncio_tasks
        self.webrtc_calls = webrtc_calls

    def collect(self) -> Iterator[Metric]:
        stats, process = self.stats, self.process
        for name, help_text, value in (
            ("openrealtime_process_resident_memory_bytes", "Resident set size of the server process.",
             process.resident_memory_bytes),
            ("openrealtime_process_open_fds", "Open file descriptors of the server process.", process.open_fds),
            ("openrealtime_process_threads", "OS threads of the server process.", process.threads),
        ):
            if value is not None:  # left out where /proc cannot be read
                yield GaugeMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("openrealtime_asyncio_tasks", "Tasks alive on the server's event loop.",
                                value=self.asyncio_tasks)
        active = GaugeMetricFamily("openrealtime_sessions_active", "Realtime sessions open now, by transport.",
                                   labels=["transport"])
        for transport in TRANSPORTS:
            active.add_metric([transport], stats.sessions_active(transport))
        yield active
        yield _counter("openrealtime_sessions", "Realtime sessions started, by transport.", "transport",
                       stats.sessions_started)
        yield GaugeMetricFamily("openrealtime_webrtc_calls_active", "WebRTC calls live now.", value=self.webrtc_calls)
        yield _counter("openrealtime_responses", "Responses ended (response.done), by status.", "status",
                       stats.responses)
        yield CounterMetricFamily("openrealtime_events_received", "Client events received by sessions.",
                                  value=stats.events_received)
        yield _counter("openrealtime_errors_sent", "`error` events sent to clients, by code.", "code", stats.errors)
        yield _counter("openrealtime_speculative_llm_requests",
                       "Speculative LLM requests started, by kind: open (while the user speaks, the prompt up "
                       "to their words so far), pause (at a pause, the whole prompt and with llm_speculate the "
                       "reply).", "kind", stats.prefills)
        waits = GaugeMetricFamily(
            "openrealtime_queue_wait_level_seconds",
            f"Median wait of the requests each model (llm, stt, tts) started in the last "
            f"{QUEUE_WAITS.window_s:g} s: what max_queue_wait_ms compares the worst of with.",
            labels=["queue"])
        levels = QUEUE_WAITS.levels()
        for queue in sorted({"llm", "stt", "tts", *levels}):
            waits.add_metric([queue], levels.get(queue, 0.0))
        yield waits


def _counter(name: str, help_text: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for key, n in sorted(counts.items()):
        family.add_metric([key], n)
    return family


def render(stats: EngineStats, process: ProcessSample, *, asyncio_tasks: int, webrtc_calls: int,
           registry: CollectorRegistry = REGISTRY) -> str:
    """The whole exposition: this app's figures, then the process-wide registry's metrics."""
    server = ServerCollector(stats, process, asyncio_tasks=asyncio_tasks, webrtc_calls=webrtc_calls)
    return (generate_latest(server) + generate_latest(registry)).decode("utf-8")


@router.get("/metrics", dependencies=[Depends(require_key)], include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Scrape target; cheap enough to poll every few seconds (a /proc read and in-memory counters)."""
    state = request.app.state
    body = render(state.engine.stats, sample_process(), asyncio_tasks=len(asyncio.all_tasks()),
                  webrtc_calls=len(state.calls))
    return Response(body, media_type=CONTENT_TYPE)
