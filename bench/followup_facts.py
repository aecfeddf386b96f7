"""Does the answer after a tool result keep the result's facts? Sampled, per result-turn hint.

The follow-up cases of bench/tool_cases.py (a conversation that holds a call and its output) plus
the agent-SDK e2e test's weather turn, answered by the in-process backend at the server's default
sampling (temperature 0.8, top-k 40, top-p 0.95) `--samples` times each, once per hint wording
(the line that closes the results turn, ``tool_calling.TOOL_RESULT_HINT``) and min-p value. A
reply is right when it calls nothing and mentions the case's `answer_contains`. One
bench/tool_calls.py run samples each case once, which cannot tell a 90% wording from a 70% one.

    .venv/bin/python bench/followup_facts.py --samples 12

Prints one table; writes JSON to bench/results/followup_facts.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tool_cases import CASES, TOOLS, Case  # noqa: E402
from openrealtime.backends import tool_calling  # noqa: E402
from openrealtime.backends.llm import (  # noqa: E402
    ChatMessage,
    GenerationParams,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
)

HINTS = {
    "plain": "Answer the user's question from these results, in plain words.",
    "facts": "Answer the user's question from these results, in plain words, keeping their numbers and names.",
}
SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."
# The agents-SDK e2e test (tests/e2e/test_agents_tools_auto.py): one tool, its own instructions.
AGENT = ("agents-weather", "You are a weather assistant. Answer in one short sentence.",
         [ToolSpec("get_weather", "Get the current weather for a city.",
                   {"properties": {"city": {"title": "City", "type": "string"}}, "required": ["city"],
                    "title": "get_weather_args", "type": "object", "additionalProperties": False})],
         "What's the weather in Paris?", ("get_weather", {"city": "Paris"}),
         "It is 23 degrees and sunny in Paris.", ("23", "twenty-three", "twenty three"))


def cases() -> list[tuple[str, str, list[ToolSpec], str, tuple[str, dict], str, tuple[str, ...]]]:
    specs = [ToolSpec(t["name"], t.get("description"), t.get("parameters")) for t in TOOLS]
    out = [(c.id, SYSTEM, specs, c.request, c.prior_call, c.prior_output, c.answer_contains)
           for c in CASES if isinstance(c, Case) and c.prior_call is not None]
    return [*out, AGENT]  # type: ignore[list-item]


async def answer(backend: Any, system: str, tools: list[ToolSpec], request: str, call: tuple[str, dict],
                 output: str, min_p: float) -> tuple[str, bool]:
    chat = [ChatMessage("system", system), ChatMessage("user", request),
            ChatMessage("assistant", "", tool_calls=[ToolCall("call_1", call[0], json.dumps(call[1]))]),
            ChatMessage("tool", output, tool_call_id="call_1")]
    text, called = "", False
    async for event in backend.stream(chat, GenerationParams(temperature=0.8, max_tokens=60, tools=tools,
                                                                   min_p=min_p)):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, ToolCallDelta):
            called = True
    return text, called


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--hints", nargs="+", default=list(HINTS), choices=list(HINTS))
    ap.add_argument("--min-p", nargs="+", type=float, default=[0.0, 0.05], help="min-p sampling values")
    ap.add_argument("--cases", nargs="+", metavar="ID", help="only these cases")
    args = ap.parse_args()
    from openrealtime.backends.gguf import ensure_model
    from openrealtime.backends.llamacpp import LlamaCppBackend
    from openrealtime.config import load_settings

    backend = await asyncio.to_thread(LlamaCppBackend, ensure_model(args.model, load_settings().model_cache_dir))
    chosen = [c for c in cases() if not args.cases or c[0] in args.cases]
    table: dict[str, dict[str, float]] = {}
    replies: dict[str, dict[str, list[str]]] = {}
    try:
        for _ in range(args.samples):  # rounds alternate the hints, so a drift hits both
            for hint in args.hints:
                tool_calling.TOOL_RESULT_HINT = HINTS[hint]
                for min_p in args.min_p:
                    label = f"{hint} min_p={min_p:g}"
                    for cid, system, tools, request, call, output, expect in chosen:
                        text, called = await answer(backend, system, tools, request, call, output, min_p)
                        ok = not called and any(e in text.lower() for e in expect)
                        row = table.setdefault(label, {})
                        row[cid] = row.get(cid, 0) + ok / args.samples
                        replies.setdefault(label, {}).setdefault(cid, []).append(("" if ok else "MISS ") + text)
    finally:
        await backend.close()
    ids = [c[0] for c in chosen]
    print(f"share of sampled answers that keep the result's fact ({args.model}, {args.samples} samples, "
          f"temperature 0.8)")
    print(f"{'hint, sampling':<20}" + "".join(f"{i:>18}" for i in ids) + f"{'mean':>8}")
    for label, row in table.items():
        mean = sum(row.values()) / len(row)
        print(f"{label:<20}" + "".join(f"{row[i]:>18.2f}" for i in ids) + f"{mean:>8.2f}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "followup_facts.json").write_text(json.dumps(
        {"model": args.model, "samples": args.samples, "min_p": args.min_p, "hints": {h: HINTS[h] for h in args.hints},
         "share_right": table, "replies": replies}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
