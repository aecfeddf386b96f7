"""Soak: many short WebSocket sessions and WebRTC calls in waves; does the server give it all back?

Starts the real server (loopback only), warms it up with one turn per transport, then runs
`--sessions` WebSocket sessions and `--calls` WebRTC calls (aiortc peers, `oai-events` data
channel) in `--waves` waves, each one text turn (a few tokens) and a hang-up. After a settle
period it compares the server process (RSS, open fds, threads from /proc/<pid>) and GET /metrics
(asyncio tasks, active sessions and calls) with the warmed-up state. Prints one table; writes
bench/results/soak.json.

    .venv/bin/python bench/soak.py [--sessions 100] [--calls 20] [--waves 5] [--settle-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import websockets  # noqa: E402

from openrealtime.api.metrics import sample_process  # noqa: E402
from tests.e2e.conftest import Server, assert_valid_server_event, start_server, stop_server  # noqa: E402
from tests.e2e.webrtc_client import hangup, open_call  # noqa: E402
from tests.metrics_text import parse, value  # noqa: E402

TURN = [
    {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                           "instructions": "Reply in a few words."}},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Say hello."}]}},
    {"type": "response.create", "response": {"output_modalities": ["text"], "max_output_tokens": 8}},
]
ROWS = [  # (label, where the figure comes from)
    ("RSS (MiB)", "rss"), ("open fds", "fds"), ("threads", "threads"),
    ("asyncio tasks", "openrealtime_asyncio_tasks"),
    ("sessions active (websocket)", "ws"), ("sessions active (webrtc)", "rtc"),
    ("webrtc calls active", "openrealtime_webrtc_calls_active"),
]


async def snapshot(server: Server) -> dict[str, float]:
    """The server process as /proc and /metrics see it now."""
    proc = sample_process(server.proc.pid)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {server.api_key}"})
    response.raise_for_status()
    samples = parse(response.text)
    return {
        "rss": round((proc.resident_memory_bytes or 0) / 2**20, 1), "fds": proc.open_fds or 0,
        "threads": proc.threads or 0,
        "openrealtime_asyncio_tasks": value(samples, "openrealtime_asyncio_tasks"),
        "ws": value(samples, "openrealtime_sessions_active", transport="websocket"),
        "rtc": value(samples, "openrealtime_sessions_active", transport="webrtc"),
        "openrealtime_webrtc_calls_active": value(samples, "openrealtime_webrtc_calls_active"),
    }


async def ws_turn(server: Server, timeout_s: float) -> str:
    """One WebSocket session with one text turn; returns the response status (or what went wrong)."""
    url = f"{server.ws_url}/v1/realtime?model=gpt-realtime"
    async with asyncio.timeout(timeout_s), websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {server.api_key}"}, max_size=None) as ws:
        for event in TURN:
            await ws.send(json.dumps(event))
        async for message in ws:
            event = json.loads(message)
            assert_valid_server_event(event)
            if event["type"] == "error":
                return f"error {event['error'].get('code')}"
            if event["type"] == "response.done":
                return event["response"]["status"]
    return "closed early"


async def webrtc_turn(server: Server, timeout_s: float) -> str:
    """One WebRTC call: a text turn over the data channel, then hang up."""
    async with asyncio.timeout(timeout_s):
        peer, call_id, _ = await open_call(server)
        try:
            for event in TURN:
                peer.send(event)
            events = await peer.collect("response.done", timeout_s)
            errors = [e for e in events if e["type"] == "error"]
            status = f"error {errors[0]['error'].get('code')}" if errors else events[-1]["response"]["status"]
        finally:
            await hangup(server, call_id)
            await peer.close()
    return status


async def guarded(kind: str, turn: Any, server: Server, timeout_s: float, limit: asyncio.Semaphore) -> str:
    async with limit:
        try:
            return await turn(server, timeout_s)
        except Exception as exc:  # counted, not raised: the table shows failures
            return f"{kind} failed: {type(exc).__name__}"


async def soak(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    start = await snapshot(server)
    # Warm-up: the first turn of each transport allocates caches that are not leaks.
    warm = [await ws_turn(server, args.timeout_s), await webrtc_turn(server, args.timeout_s)]
    await asyncio.sleep(args.settle_s)
    warmed = await snapshot(server)
    outcomes: Counter[str] = Counter()
    waves: list[float] = []
    limit = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()
    for wave in range(args.waves):
        n_ws = args.sessions // args.waves + (wave < args.sessions % args.waves)
        n_rtc = args.calls // args.waves + (wave < args.calls % args.waves)
        started = time.monotonic()
        results = await asyncio.gather(
            *(guarded("websocket", ws_turn, server, args.timeout_s, limit) for _ in range(n_ws)),
            *(guarded("webrtc", webrtc_turn, server, args.timeout_s, limit) for _ in range(n_rtc)))
        outcomes.update(f"websocket {r}" for r in results[:n_ws])
        outcomes.update(f"webrtc {r}" for r in results[n_ws:])
        waves.append(round(time.monotonic() - started, 1))
        print(f"  wave {wave + 1}/{args.waves}: {n_ws} sessions, {n_rtc} calls in {waves[-1]} s", flush=True)
    soak_s = time.monotonic() - t0
    await asyncio.sleep(args.settle_s)  # closing calls and sessions finish their teardown
    after = await snapshot(server)
    return {"start": start, "warmed": warmed, "after": after, "outcomes": dict(outcomes), "warmup": warm,
            "wave_s": waves, "soak_s": round(soak_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100, help="WebSocket sessions (default 100)")
    parser.add_argument("--calls", type=int, default=20, help="WebRTC calls (default 20)")
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=10, help="turns at once (default 10)")
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait before the last snapshot")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="longest one turn may take")
    args = parser.parse_args()

    server = start_server(name="bench-soak")
    try:
        result = asyncio.run(soak(server, args))
    finally:
        stop_server(server)
    tracebacks = server.log_text().count("Traceback")

    print(f"\nsoak: {args.sessions} WebSocket sessions + {args.calls} WebRTC calls in {args.waves} waves, "
          f"{result['soak_s']} s; settled {args.settle_s:.0f} s")
    print("| | start | warmed up | after soak | change |\n|---|---|---|---|---|")
    for label, key in ROWS:
        a, b, c = result["start"][key], result["warmed"][key], result["after"][key]
        print(f"| {label} | {a:g} | {b:g} | {c:g} | {c - b:+g} |")
    print("\noutcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items())))
    print(f"tracebacks in the server log: {tracebacks}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"args": vars(args), **result, "tracebacks": tracebacks}, indent=2))
    print(f"wrote {out / 'soak.json'}")


if __name__ == "__main__":
    main()
