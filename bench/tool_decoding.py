"""Schema-guided tool-call decoding speed on the local models, next to free text generation.

For each model: a warm-up, then N forced calls per schema (get_weather: string + enum;
book_table: nested object, integer range, array, optional number) and one free-text reply of
similar length. Reports the call tokens (forced + sampled), how many of them the model sampled,
model evaluations, and tokens/s. Prints a table and writes JSON to bench/results/.

    .venv/bin/python bench/tool_decoding.py [--models smollm2-135m qwen2.5-0.5b] [-n 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
from pathlib import Path

from openrealtime.backends.gguf import ModelError, ensure_model
from openrealtime.backends.llamacpp import LlamaCppBackend
from openrealtime.backends.llm import ChatMessage, Finished, GenerationParams, ToolCallDelta, ToolSpec
from openrealtime.config import Settings

ROOT = Path(__file__).resolve().parents[1]
WEATHER = ToolSpec("get_weather", "Get the current weather in a city.", {
    "type": "object", "properties": {"location": {"type": "string"},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"]})
BOOKING = ToolSpec("book_table", "Book a restaurant table.", {
    "type": "object",
    "properties": {
        "restaurant": {"type": "string"},
        "guests": {"type": "integer", "minimum": 1, "maximum": 12},
        "when": {"type": "object", "properties": {"day": {"type": "string"}, "hour": {"type": "integer"}},
                 "required": ["day", "hour"]},
        "notes": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "budget": {"type": "number"},
    },
    "required": ["restaurant", "guests", "when"]})
CASES = [(WEATHER, "What's the weather like in Paris right now?"),
         (BOOKING, "Book a table for four at Chez Paul on Friday at 8pm, by the window.")]


class _Stats(logging.Handler):
    """Reads the backend's per-request debug line for sampled-token and evaluation counts."""

    pattern = re.compile(r"(\d+) tokens \((\d+) sampled, (\d+) model calls")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: tuple[int, int, int] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match:
            self.last = tuple(int(x) for x in match.groups())  # type: ignore[assignment]


async def collect_call(llm: LlamaCppBackend, messages: list[ChatMessage], params: GenerationParams
                       ) -> tuple[str, Finished]:
    """A forced call's arguments text and its end (shared with bench/guided_engines.py)."""
    args, finished = "", None
    async for event in llm.stream(messages, params):
        if isinstance(event, ToolCallDelta):
            args += event.arguments
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return args, finished


async def call_once(llm: LlamaCppBackend, tool: ToolSpec, question: str, seed: int) -> tuple[int, float, str]:
    messages = [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", question)]
    params = GenerationParams(temperature=0.7, seed=seed, tools=[WEATHER, BOOKING], tool_choice=tool.name)
    t0 = time.monotonic()
    args, finished = await collect_call(llm, messages, params)
    return finished.usage.completion_tokens, time.monotonic() - t0, args


async def text_once(llm: LlamaCppBackend, n: int) -> tuple[int, float]:
    messages = [ChatMessage("system", "You are a helpful assistant."),
                ChatMessage("user", "Tell me about Paris in a few sentences.")]
    t0 = time.monotonic()
    finished = None
    async for event in llm.stream(messages, GenerationParams(temperature=0.7, seed=1, max_tokens=n)):
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    return finished.usage.completion_tokens, time.monotonic() - t0


async def bench(name: str, n: int, stats: _Stats) -> dict:
    path = ensure_model(name, Settings().model_cache_dir, progress=False)
    llm = await asyncio.to_thread(LlamaCppBackend, path, n_ctx=2048, name=name)
    out: dict = {"model": name, "cases": {}}
    try:
        await call_once(llm, WEATHER, CASES[0][1], 0)  # warm-up: token classes, prompt in the KV cache
        for tool, question in CASES:
            tokens = seconds = sampled = calls = 0
            example = ""
            for seed in range(n):
                t, s, example = await call_once(llm, tool, question, seed)
                tokens, seconds = tokens + t, seconds + s
                if stats.last:
                    sampled, calls = sampled + stats.last[1], calls + stats.last[2]
            out["cases"][tool.name] = {"calls": n, "tokens": tokens, "sampled": sampled, "model_calls": calls,
                                       "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 1),
                                       "ms_per_call": round(seconds / n * 1000), "example": example}
        await text_once(llm, 8)
        t, s = await text_once(llm, 40)
        out["free_text"] = {"tokens": t, "seconds": round(s, 3), "tok_per_s": round(t / s, 1)}
    finally:
        await llm.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    stats = _Stats()
    logger = logging.getLogger("openrealtime.backends.llamacpp")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(stats)
    results = []
    for name in args.models:
        try:
            results.append(await bench(name, args.n, stats))
        except ModelError as exc:
            print(f"{name}: skipped ({exc})")
    print(f"{'model':14} {'case':12} {'tok/call':>8} {'sampled':>8} {'evals':>6} {'ms/call':>8} {'tok/s':>7}"
          f"   free text tok/s")
    for r in results:
        for case, c in r["cases"].items():
            print(f"{r['model']:14} {case:12} {c['tokens'] / c['calls']:8.1f} {c['sampled'] / c['calls']:8.1f} "
                  f"{c['model_calls'] / c['calls']:6.1f} {c['ms_per_call']:8d} {c['tok_per_s']:7.1f}"
                  f"   {r['free_text']['tok_per_s']}")
        for case, c in r["cases"].items():
            print(f"  {case}: {c['example']}")
    dest = ROOT / "bench" / "results" / "tool_decoding.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(results, indent=2))
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
