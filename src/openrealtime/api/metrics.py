"""`GET /metrics`: process and engine gauges in the Prometheus text format (version 0.0.4).

Hand-written rather than via prometheus_client: a dozen series do not justify a dependency, and
the engine's counters (engine/stats.py) stay plain numbers with no registry behind them. The route
takes the same API key as /v1/models, so session and error counts are not public on a keyed server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..engine.stats import TRANSPORTS, EngineStats
from .auth import require_key

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


def _label_value(value: str) -> str:
    # The exposition format escapes exactly these three in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str,
            samples: Iterable[tuple[Mapping[str, str], float | int]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        rendered = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
    return lines


def render(stats: EngineStats, process: ProcessSample, *, asyncio_tasks: int, webrtc_calls: int) -> str:
    """The whole exposition: one HELP/TYPE block per metric family, newline-terminated."""
    lines: list[str] = []
    for name, help_text, value in (
        ("openrealtime_process_resident_memory_bytes", "Resident set size of the server process.",
         process.resident_memory_bytes),
        ("openrealtime_process_open_fds", "Open file descriptors of the server process.", process.open_fds),
        ("openrealtime_process_threads", "OS threads of the server process.", process.threads),
    ):
        if value is not None:
            lines += _family(name, "gauge", help_text, [({}, value)])
    lines += _family("openrealtime_asyncio_tasks", "gauge", "Tasks alive on the server's event loop.",
                     [({}, asyncio_tasks)])
    lines += _family("openrealtime_sessions_active", "gauge", "Realtime sessions open now, by transport.",
                     [({"transport": t}, stats.sessions_active(t)) for t in TRANSPORTS])
    lines += _family("openrealtime_sessions_total", "counter", "Realtime sessions started, by transport.",
                     [({"transport": t}, n) for t, n in sorted(stats.sessions_started.items())])
    lines += _family("openrealtime_webrtc_calls_active", "gauge", "WebRTC calls live now.", [({}, webrtc_calls)])
    lines += _family("openrealtime_responses_total", "counter", "Responses ended (response.done), by status.",
                     [({"status": s}, n) for s, n in sorted(stats.responses.items())])
    lines += _family("openrealtime_events_received_total", "counter", "Client events received by sessions.",
                     [({}, stats.events_received)])
    lines += _family("openrealtime_errors_sent_total", "counter", "`error` events sent to clients, by code.",
                     [({"code": c}, n) for c, n in sorted(stats.errors.items())])
    return "\n".join(lines) + "\n"


@router.get("/metrics", dependencies=[Depends(require_key)], include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Scrape target; cheap enough to poll every few seconds (a /proc read and a few counters)."""
    state = request.app.state
    body = render(state.engine.stats, sample_process(), asyncio_tasks=len(asyncio.all_tasks()),
                  webrtc_calls=len(state.calls))
    return Response(body, media_type=CONTENT_TYPE)
