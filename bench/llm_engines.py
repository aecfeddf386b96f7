"""In-process LLM backend against llama.cpp's own server, on the same GGUF (issue 16, part 2).

The in-process backend runs ik_llama.cpp (the ``ik-llama-cpp-python`` wheel) with continuous
batching; the reference is llama-cpp-python's OpenAI-compatible server (mainline llama.cpp built
from source for this CPU, ``.venv/llama-server``, made by ``make test``). Both answer the same
questions at temperature 0, one at a time, each a fresh conversation after the same system prompt
(which both keep cached), in alternating rounds so a drift of the machine hits both. Per engine:
time to the first token of a short spoken-style question (the voice turn's case), of a question
with a long new part (prompt evaluation speed), and generation tokens/s after the first token.

    .venv/bin/python bench/llm_engines.py --model qwen2.5-1.5b --rounds 3

Prints one table; writes JSON to bench/results/llm_engines.json.
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVER_PYTHON = ROOT / ".venv" / "llama-server" / "bin" / "python"
QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a leap year?",
    "Give me one tip for sleeping well.",
    "What colour is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "Why do leaves fall in autumn?",
]
# A new part of ~250 tokens: prompt evaluation speed, as after a long user turn or a tool result.
LONG = ("Here is a note from my trip. " + " ".join(
    f"On day {i} we walked along the river, visited the old market, ate bread and cheese, and "
    "talked about the weather and the trains." for i in range(1, 8)) + " Summarise it in one sentence.")
MAX_TOKENS = 48


@dataclass
class Sample:
    ttft_ms: float
    tokens: int
    decode_tps: float


@dataclass
class Row:
    name: str
    short: list[Sample] = field(default_factory=list)
    long: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        def med(xs: list[float]) -> float:
            return round(statistics.median(xs), 1) if xs else float("nan")

        return {"short_ttft_ms": med([s.ttft_ms for s in self.short]),
                "long_ttft_ms": med([s.ttft_ms for s in self.long]),
                "decode_tps": med([s.decode_tps for s in self.short + self.long if s.tokens > 4]),
                "samples": len(self.short) + len(self.long)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(system: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


class InProcess:
    """The openrealtime backend, called as the engine calls it."""

    def __init__(self, path: Path, **kw: object):
        from openrealtime.backends.llamacpp import LlamaCppBackend

        self.backend = LlamaCppBackend(path, **kw)  # type: ignore[arg-type]

    async def ask(self, system: str, question: str) -> Sample:
        from openrealtime.backends.llm import ChatMessage, Finished, GenerationParams, TextDelta

        chat = [ChatMessage(role=m["role"], content=m["content"]) for m in messages(system, question)]  # type: ignore[arg-type]
        params = GenerationParams(temperature=0.0, max_tokens=MAX_TOKENS)
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        async for event in self.backend.stream(chat, params):
            if isinstance(event, TextDelta) and first is None:
                first = time.perf_counter()
            if isinstance(event, Finished):
                last = time.perf_counter()
                tokens = event.usage.completion_tokens
        assert first is not None and last is not None
        return Sample((first - t0) * 1000, tokens, (tokens - 1) / (last - first) if last > first else 0.0)

    async def close(self) -> None:
        await self.backend.close()


class Server:
    """llama-cpp-python's server (mainline llama.cpp) over its chat-completions stream."""

    def __init__(self, path: Path, threads: int | None):
        self.port = free_port()
        args = [str(SERVER_PYTHON), "-m", "llama_cpp.server", "--model", str(path), "--n_ctx", "4096",
                "--host", "127.0.0.1", "--port", str(self.port)]
        if threads:
            args += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}/v1"
        for _ in range(600):
            try:
                if httpx.get(f"{self.base}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            self.proc.kill()
            raise RuntimeError("llama_cpp.server did not start")
        self.client = httpx.AsyncClient(timeout=300)

    async def ask(self, system: str, question: str) -> Sample:
        body = {"messages": messages(system, question), "temperature": 0.0, "max_tokens": MAX_TOKENS,
                "stream": True}
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        async with self.client.stream("POST", f"{self.base}/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    tokens += 1  # one chunk per token
                    last = time.perf_counter()
                    if first is None:
                        first = last
        assert first is not None and last is not None
        return Sample((first - t0) * 1000, tokens, (tokens - 1) / (last - first) if last > first else 0.0)

    async def close(self) -> None:
        await self.client.aclose()
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=["in-process", "in-process-1seq", "server", "server-2t"],
                    help="in-process (defaults), in-process-1seq (n_parallel 1: flash attention allowed), "
                         "server (llama-cpp-python defaults: 1 generation thread), server-2t (2 threads)")
    args = ap.parse_args()
    if not SERVER_PYTHON.exists():
        sys.exit(f"{SERVER_PYTHON} is missing: make test builds it")
    from openrealtime.backends.gguf import ensure_model
    from openrealtime.config import load_settings

    settings = load_settings()
    path = ensure_model(args.model, settings.model_cache_dir)
    system = settings.default_instructions
    makers = {
        "in-process": lambda: InProcess(path),
        "in-process-1seq": lambda: InProcess(path, n_parallel=1),
        "server": lambda: Server(path, None),
        "server-2t": lambda: Server(path, 2),
    }
    engines = {}
    for name in args.engines:
        engines[name] = await asyncio.to_thread(makers[name])
    rows = {name: Row(name) for name in engines}
    try:
        for engine in engines.values():  # warm: the system prompt cached, first-call costs paid
            await engine.ask(system, "Hello.")
        for _ in range(args.rounds):
            for name, engine in engines.items():
                for q in QUESTIONS:
                    rows[name].short.append(await engine.ask(system, q))
                rows[name].long.append(await engine.ask(system, LONG))
                await asyncio.sleep(0.5)
    finally:
        for engine in engines.values():
            await engine.close()
    out = {name: row.summary() for name, row in rows.items()}
    print(f"model {args.model}, {args.rounds} rounds x {len(QUESTIONS)} short + 1 long, "
          f"{os.cpu_count()} cores, medians")
    print(f"{'engine':<18}{'short ttft ms':>15}{'long ttft ms':>14}{'decode tok/s':>14}")
    for name, s in out.items():
        print(f"{name:<18}{s['short_ttft_ms']:>15}{s['long_ttft_ms']:>14}{s['decode_tps']:>14}")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "llm_engines.json").write_text(json.dumps({"model": args.model, "rounds": args.rounds,
                                                          "rows": out}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
