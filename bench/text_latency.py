"""Text-turn latency: `response.create` -> first text delta, and tokens/s, per model and transport.

Starts the real server once per model, then runs the same turns over WebSocket (openai SDK) and
WebRTC (aiortc peer, `oai-events` data channel). Prints one table; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from openai import AsyncOpenAI

KEY = "sk-bench"
PROMPTS = ["Say hello in one sentence.", "Name three colours.", "What is two plus two?",
           "Give me a tip for sleeping well.", "Describe the sea in one sentence."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OPENREALTIME_API_KEYS": f'["{KEY}"]', "OPENREALTIME_ICE__ADDRESSES": '["127.0.0.1"]',
           "OPENREALTIME_ICE__GATHER_INTERFACES": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "openrealtime.cli", "serve", "--port", str(port),
                             "--model", model, "--preload", "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def turn_events(prompt: str, max_tokens: int) -> list[dict]:
    return [
        {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                               "temperature": 0.0}},
        {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}},
        {"type": "response.create", "response": {"max_output_tokens": max_tokens}},
    ]


class Timing:
    def __init__(self) -> None:
        self.sent = 0.0
        self.first = 0.0
        self.done = 0.0
        self.tokens = 0

    def row(self) -> dict:
        gen = max(self.done - self.first, 1e-6)
        return {"ttft_ms": (self.first - self.sent) * 1000,
                "tokens_per_s": (self.tokens - 1) / gen if self.tokens > 1 else 0.0,
                "output_tokens": self.tokens}

    def on_event(self, event: dict) -> bool:
        if event["type"] == "response.output_text.delta" and not self.first:
            self.first = time.perf_counter()
        if event["type"] == "response.done":
            self.done = time.perf_counter()
            self.tokens = event["response"]["usage"]["output_tokens"]
            return True
        return False


async def ws_turn(base: str, prompt: str, max_tokens: int) -> dict:
    client = AsyncOpenAI(api_key=KEY, base_url=f"{base}/v1", websocket_base_url=base.replace("http", "ws") + "/v1")
    async with client.realtime.connect(model="gpt-realtime") as conn:
        t = Timing()
        events = turn_events(prompt, max_tokens)
        for e in events[:-1]:
            await conn.send(e)  # type: ignore[arg-type]
        t.sent = time.perf_counter()
        await conn.send(events[-1])  # type: ignore[arg-type]
        async for event in conn:
            if t.on_event(event.to_dict()):
                return t.row()
    raise RuntimeError("no response.done")


async def rtc_turn(base: str, prompt: str, max_tokens: int) -> dict:
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("oai-events")
    pc.addTransceiver("audio", direction="sendrecv")
    opened = asyncio.Event()
    queue: asyncio.Queue[dict] = asyncio.Queue()
    channel.on("open", opened.set)
    channel.on("message", lambda m: queue.put_nowait(json.loads(m)))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{base}/v1/realtime/calls", headers={"Authorization": f"Bearer {KEY}"},
                            json={"sdp": pc.localDescription.sdp})
        r.raise_for_status()
        answer = r.json()
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        try:
            await asyncio.wait_for(opened.wait(), 30)
            t = Timing()
            events = turn_events(prompt, max_tokens)
            for e in events[:-1]:
                channel.send(json.dumps(e))
            t.sent = time.perf_counter()
            channel.send(json.dumps(events[-1]))
            while not t.on_event(await asyncio.wait_for(queue.get(), 120)):
                pass
            return t.row()
        finally:
            await http.post(f"{base}/v1/realtime/calls/{answer['id']}/hangup",
                            headers={"Authorization": f"Bearer {KEY}"})
            await pc.close()


async def run(models: list[str], turns: int, max_tokens: int) -> list[dict]:
    rows = []
    for model in models:
        proc, base = start_server(model)
        try:
            for transport, fn in (("websocket", ws_turn), ("webrtc", rtc_turn)):
                await fn(base, "Warm up.", 4)
                samples = [await fn(base, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(turns)]
                rows.append({
                    "model": model, "transport": transport, "turns": turns,
                    "ttft_ms_median": statistics.median(s["ttft_ms"] for s in samples),
                    "ttft_ms_max": max(s["ttft_ms"] for s in samples),
                    "tokens_per_s_median": statistics.median(s["tokens_per_s"] for s in samples),
                    "samples": samples,
                })
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    rows = asyncio.run(run(args.models, args.turns, args.max_tokens))
    print(f"\n{'model':16} {'transport':10} {'turns':>5} {'TTFT median ms':>15} {'TTFT max ms':>12} "
          f"{'tok/s median':>13}")
    for r in rows:
        print(f"{r['model']:16} {r['transport']:10} {r['turns']:>5} {r['ttft_ms_median']:>15.0f} "
              f"{r['ttft_ms_max']:>12.0f} {r['tokens_per_s_median']:>13.1f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"text_latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
