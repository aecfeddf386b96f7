"""The two signals the in-process backend decides `tool_choice: "auto"` on, per case of
`bench/tool_cases.py`, so that its thresholds can be re-measured rather than trusted.

1. call probability: the mass the model's first logits put on starting a call in any form
   (`tool_calling.call_probability`);
2. name confidence: with the canonical opening `<tool_call>\\n{"name": "` in the context, the
   probability of the likeliest first token of a function name (`tool_calling.name_confidence`).

The backend calls when (1) >= `CALL_FLOOR` (after a tool result `CALL_THRESHOLD_AFTER_RESULT`) and
(2) >= `NAME_CONFIDENCE`, then still takes back a call that repeats an answered one or invents its
values. Here both signals are read for every case (the floors set to 0 for the run, each reply
stopped at its first event), with the prompt the server builds: default instructions, the five
tools, the request as text (spoken cases too: the transcript is what the LLM sees), and for
follow-ups the prior call and its output. `bench/tool_calls.py` scores whole replies through the
server; this only shows where the thresholds sit. Prints one table, writes
bench/results/tool_probe.json.

    .venv/bin/python bench/tool_probe.py [--models qwen2.5-1.5b]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tool_cases import CASES, TOOLS, Case  # noqa: E402
from openrealtime.backends import llamacpp  # noqa: E402
from openrealtime.backends.gguf import ModelError, ensure_model  # noqa: E402
from openrealtime.backends.llm import ChatMessage, GenerationParams, ToolCall, ToolSpec  # noqa: E402
from openrealtime.config import Settings  # noqa: E402

LINE = re.compile(r"(call probability|name confidence) ([0-9.]+)")
NAMES = re.compile(r"; names ((?:\S+=[0-9.]+ ?)+)$")


class _Signals(logging.Handler):
    """Reads the backend's debug lines for the two signals of the current request."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.values: dict[str, float] = {}
        self.names: dict[str, dict[str, float]] = {}  # "names": each function's probability

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if match := LINE.search(message):
            self.values.setdefault(match.group(1), float(match.group(2)))
        if (names := NAMES.search(message)) and "names" not in self.names:
            self.names["names"] = {k: float(v) for k, v in (pair.split("=") for pair in names.group(1).split())}


def messages(case: Case, instructions: str) -> list[ChatMessage]:
    """The conversation the server's engine would hand the backend for the case's first reply."""
    out = [ChatMessage("system", instructions), ChatMessage("user", case.request)]
    if case.prior_call is not None:
        name, arguments = case.prior_call
        out.append(ChatMessage("assistant", "", tool_calls=[ToolCall("call_prior", name, json.dumps(arguments))]))
        out.append(ChatMessage("tool", case.prior_output or "", tool_call_id="call_prior"))
    return out


def decision(case: Case, p_call: float, confidence: float | None) -> bool:
    """Whether today's thresholds open a call (before the repeat and grounding checks)."""
    floor = llamacpp.CALL_THRESHOLD_AFTER_RESULT if case.prior_call else llamacpp.CALL_FLOOR
    return p_call >= floor and confidence is not None and confidence >= llamacpp.NAME_CONFIDENCE


async def probe(model: str, signals: _Signals) -> list[dict[str, Any]]:
    settings = Settings()
    path = await asyncio.to_thread(ensure_model, model, settings.model_cache_dir, progress=False)
    llm = await asyncio.to_thread(llamacpp.LlamaCppBackend, path, n_ctx=4096, name=model)
    tools = [ToolSpec(t["name"], t["description"], t["parameters"]) for t in TOOLS]
    rows = []
    floors = llamacpp.CALL_FLOOR, llamacpp.CALL_THRESHOLD_AFTER_RESULT
    try:
        for case in CASES:
            signals.values, signals.names = {}, {}
            llamacpp.CALL_FLOOR = llamacpp.CALL_THRESHOLD_AFTER_RESULT = 0.0  # read both signals always
            try:
                stream = llm.stream(messages(case, settings.default_instructions),
                                    GenerationParams(temperature=0.8, seed=1, tools=tools))
                async for _event in stream:
                    break  # the decision is made (and logged) before the first event
                await stream.aclose()
            finally:
                llamacpp.CALL_FLOOR, llamacpp.CALL_THRESHOLD_AFTER_RESULT = floors
            p_call = signals.values.get("call probability", 0.0)
            confidence = signals.values.get("name confidence")
            kind = "follow-up" if case.prior_call else "call" if case.calls else "none"
            names = sorted(signals.names.get("names", {}).items(), key=lambda kv: -kv[1])
            rows.append({"id": case.id, "kind": kind, "needs_call": bool(case.calls), "p_call": p_call,
                         "name_confidence": confidence, "calls": decision(case, p_call, confidence),
                         "expected": [c.name for c in case.calls],
                         "names": dict(names)})
    finally:
        await llm.close()
    return rows


def print_table(model: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{model}: call when p_call >= {llamacpp.CALL_FLOOR} (after a result "
          f"{llamacpp.CALL_THRESHOLD_AFTER_RESULT}) and name confidence >= {llamacpp.NAME_CONFIDENCE}")
    print(f"{'case':18} {'kind':10} {'p_call':>7} {'name conf':>10} {'opens call':>11} {'right':>6}  "
          f"{'expected':22} first / second name")
    for r in rows:
        conf = "-" if r["name_confidence"] is None else f"{r['name_confidence']:.2f}"
        mark = "" if r["calls"] == r["needs_call"] else "NO"
        ranked = " / ".join(f"{k} {v:.2f}" for k, v in list(r["names"].items())[:2])
        print(f"{r['id']:18} {r['kind']:10} {r['p_call']:7.2f} {conf:>10} {r['calls']!s:>11} {mark:>6}  "
              f"{','.join(r['expected']):22} {ranked}")
    wrong = sum(r["calls"] != r["needs_call"] for r in rows)
    print(f"decisions right: {len(rows) - wrong}/{len(rows)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-1.5b"])
    args = parser.parse_args()
    signals = _Signals()
    logger = logging.getLogger(llamacpp.__name__)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(signals)
    results = {}
    for model in args.models:
        try:
            results[model] = await probe(model, signals)
        except ModelError as exc:
            print(f"{model}: skipped ({exc})")
            continue
        print_table(model, results[model])
    dest = ROOT / "bench" / "results" / "tool_probe.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2))
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
