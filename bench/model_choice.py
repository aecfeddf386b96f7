"""Which LLM to ship as the default, by measurement: voice-to-voice latency, answer quality and tool calls.

For each model of `--models` (default: every model we ship):

1. One server (`OPENREALTIME_LLM_MODEL`, the offline stack) and one WebRTC call per turn detection
   mode (`--turn-detection`: server_vad with `--silence-ms` 500, semantic_vad with `--eagerness`
   high), through `bench/voice_latency.py`'s aiortc client: the QUALITY questions below are spoken
   into it in real time. Per turn: the voice-to-voice latency the client heard (end of the user's
   speech in the sent audio -> first audible reply frame), the server's stage marks, the reply's
   transcript and whether it is right: a graded check, the question's accepted-answer regex
   searched case-insensitively in the reply transcript (no LLM judge). One unscored warm-up question
   first, so that no mode pays for the server's cold caches.
2. The scored tool-call suite of `bench/tool_calls.py` (its own fresh server, `--tool-cases N`:
   the first N of the 42 cases; `--no-tools` skips it): decided, precision, recall, args valid,
   call ms, exactly as that benchmark computes them.

Prints one table (a row per model) and a pick, and writes every per-turn row (replies included)
and the tool records to bench/results/model_choice-<timestamp>.json.

The pick, by a fixed rule: among the models whose answers-right fraction (all modes together) and,
when the tools ran, tool precision and tool recall are each within `--margin` (default 0.10) of
the best measured model's, the one with the lowest voice-to-voice latency (the mean of its
per-mode median heard ms). Only models measured in every mode are candidates.

    .venv/bin/python bench/model_choice.py --models qwen2.5-0.5b qwen2.5-1.5b
    .venv/bin/python bench/model_choice.py --models smollm2-135m --questions 2 --tool-cases 2   # smoke

Run time on 2 cores: about 4 min per model for the questions (10 questions x 2 modes, spoken in
real time, plus the server start), then the tool suite: roughly 20 min for qwen2.5-1.5b, less for
the smaller models; all three models, everything: about 45 min (`--no-tools`: about 12 min).
As with the other benchmarks, set OPENREALTIME_LLM_THREADS=1 when the cores are busy with other
work (it is passed to the servers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import tool_calls, voice_latency  # noqa: E402
from tests.audio_fixtures import speak  # noqa: E402
from tests.e2e.conftest import start_server, stop_server  # noqa: E402

# (spoken question, accepted answer: a regex searched case-insensitively in the reply transcript)
QUALITY: list[tuple[str, str]] = [
    ("What is the capital of France?", r"\bparis\b"),
    ("How many days are there in a week?", r"\b(seven|7)\b"),
    ("What do bees make?", r"\bhoney\b"),
    ("What is the largest planet in our solar system?", r"\bjupiter\b"),
    ("How many legs does a spider have?", r"\b(eight|8)\b"),
    ("What do you call frozen water?", r"\bice\b"),
    ("What is the opposite of hot?", r"\bcold\b"),
    ("What is twelve plus seven?", r"\b(nineteen|19)\b"),
    ("What language do people speak in Spain?", r"\b(spanish|castilian)\b"),
    # "Which animal says moo?" was dropped: Whisper tiny.en hears "moo" as "move" (every model then fails).
    ("What colour is a ripe banana?", r"\byellow\b"),
]
WARM_UP = "Hello, can you hear me?"
INSTRUCTIONS = "You are a helpful voice assistant. Answer in one short sentence."


def is_right(reply: str | None, pattern: str) -> bool:
    return bool(reply) and re.search(pattern, reply or "", re.IGNORECASE) is not None


def mode_label(turn: str, silence_ms: int, eagerness: str) -> str:
    return f"server_vad {silence_ms} ms" if turn == "server_vad" else f"semantic_vad {eagerness}"


async def quality(model: str, questions: list[tuple[str, str]], speech: list[bytes], warm_up: bytes,
                  turns: list[str], silence_ms: int) -> dict[str, Any]:
    """One server, one WebRTC call per turn detection mode, every question spoken into each."""
    env = {"OPENREALTIME_LLM_MODEL": model}
    if os.environ.get("OPENREALTIME_LLM_THREADS"):
        env["OPENREALTIME_LLM_THREADS"] = os.environ["OPENREALTIME_LLM_THREADS"]
    server = start_server(env, name="bench-model-choice")
    out: dict[str, Any] = {"modes": {}, "warm_up": None, "errors": {}}
    try:
        for turn in turns:
            warming = out["warm_up"] is None  # the first mode that runs (again if that one failed)
            audio = ([warm_up] if warming else []) + speech
            try:
                rows = await voice_latency.webrtc_turns(server, audio, silence_ms, turn,
                                                        session={"instructions": INSTRUCTIONS}, validate=False)
            except Exception as exc:  # a stuck turn fails this mode, not the whole run
                out["errors"][turn] = f"{type(exc).__name__}: {exc}"
                print(f"  {turn}: FAILED {out['errors'][turn]}", flush=True)
                continue
            if warming:
                out["warm_up"] = rows.pop(0)
            for (question, pattern), row in zip(questions, rows, strict=True):
                row.update(question=question, accepted=pattern, right=is_right(row.get("reply_text"), pattern))
                print(f"  {turn:12} {fmt_ms(row['voice_to_voice_ms']):>6} ms  {'ok ' if row['right'] else 'BAD'}  "
                      f"{question!r} -> {' '.join((row.get('reply_text') or '').split())[:90]!r}", flush=True)
            out["modes"][turn] = rows
    finally:
        stop_server(server)
    log = server.log_text()
    out["server_log"] = str(server.log_path.relative_to(ROOT))
    out["server_log_tracebacks"] = log.count("Traceback")
    return out


def summarize(result: dict[str, Any], turns: list[str], n_questions: int) -> dict[str, Any]:
    modes = result["quality"]["modes"]
    summary: dict[str, Any] = {"heard_p50_ms": {}, "right": {}}
    for turn in turns:
        rows = modes.get(turn, [])
        heard = [r["voice_to_voice_ms"] for r in rows if r.get("voice_to_voice_ms") is not None]
        summary["heard_p50_ms"][turn] = statistics.median(heard) if heard else None
        summary["right"][turn] = sum(r["right"] for r in rows)
    summary["right_total"] = sum(summary["right"].values())
    summary["asked_total"] = n_questions * len(turns)  # a failed mode's questions count as wrong
    summary["right_fraction"] = summary["right_total"] / summary["asked_total"] if summary["asked_total"] else None
    p50s = list(summary["heard_p50_ms"].values())
    summary["latency_ms"] = statistics.mean(p50s) if p50s and None not in p50s else None
    summary["tools"] = result["tools"]["summary"] if result.get("tools") else None
    return summary


def pick(summaries: dict[str, dict[str, Any]], margin: float, tools: bool) -> tuple[str | None, str]:
    """The fastest model within `margin` of the best on every quality figure; (model, why)."""
    def figures(s: dict[str, Any]) -> dict[str, float]:
        out = {"answers right": s["right_fraction"] or 0.0}
        if tools:
            t = s["tools"] or {}
            out["tool precision"] = t.get("precision") or 0.0
            out["tool recall"] = t.get("recall") or 0.0
        return out

    candidates = {m: s for m, s in summaries.items() if s["latency_ms"] is not None}
    if not candidates:
        return None, "no model was measured in every mode"
    best = {k: max(figures(s)[k] for s in candidates.values()) for k in figures(next(iter(candidates.values())))}
    eligible = {m: s for m, s in candidates.items() if all(figures(s)[k] >= best[k] - margin for k in best)}
    chosen = min(eligible, key=lambda m: eligible[m]["latency_ms"])
    left_out = [m for m in candidates if m not in eligible]
    why = (f"fastest (mean of per-mode p50 heard ms: {eligible[chosen]['latency_ms']:.0f}) of the models within "
           f"{margin:.2f} of the best on " + ", ".join(f"{k} (best {v:.2f})" for k, v in best.items())
           + (f"; outside the margin: {', '.join(left_out)}" if left_out else ""))
    return chosen, why


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


TOOL_COLUMNS = [("tool cases", "cases", "int"), ("failed", "failed", "int"), ("decided", "decided_right", "ratio"),
                ("precision", "precision", "ratio"), ("recall", "recall", "ratio"),
                ("args ok", "args_valid", "ratio"), ("call ms", "call_ms_median", "int")]


def print_table(summaries: dict[str, dict[str, Any]], turns: list[str], labels: dict[str, str], tools: bool) -> None:
    heads = [f"{t} ms" for t in turns] + ["right"]
    if tools:
        heads += [title for title, _, _ in TOOL_COLUMNS]
    widths = [max(len(h), 9) for h in heads]
    print(f"\nmodel choice ({os.cpu_count()} CPU cores): WebRTC voice-to-voice, median ms from the end of user "
          f"speech to the first reply audio the client heard, per mode ({'; '.join(labels.values())}); right: "
          f"answers accepted over all modes" + ("; then the tool-call suite" if tools else ""))
    print(f"{'model':14} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)))
    for model, s in summaries.items():
        cells = [fmt_ms(s["heard_p50_ms"][t]) for t in turns] + [f"{s['right_total']}/{s['asked_total']}"]
        if tools:
            t = s["tools"] or {}
            cells += [(fmt_ratio if kind == "ratio" else fmt_ms)(t.get(key)) for _, key, kind in TOOL_COLUMNS]
        print(f"{model:14} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(tool_calls.MODELS), choices=tool_calls.MODELS)
    parser.add_argument("--questions", type=int, help=f"only the first N of the {len(QUALITY)} quality questions")
    parser.add_argument("--turn-detection", nargs="+", default=["server_vad", "semantic_vad"],
                        choices=["server_vad", "semantic_vad"], help="one WebRTC call per mode (default: both)")
    parser.add_argument("--silence-ms", type=int, default=500, help="server_vad silence_duration_ms")
    parser.add_argument("--eagerness", default="high", choices=sorted(voice_latency.SEMANTIC_MAX_WAIT_MS),
                        help="semantic_vad eagerness")
    parser.add_argument("--tool-cases", type=int, help="only the first N tool-call cases (default: all)")
    parser.add_argument("--no-tools", action="store_true", help="skip the tool-call suite")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a tool-call response may take")
    parser.add_argument("--margin", type=float, default=0.10,
                        help="pick rule: how far below the best answers-right / tool precision / recall may be")
    args = parser.parse_args()
    voice_latency.EAGERNESS = args.eagerness  # read by its session_config and trailing_ms
    turns = list(dict.fromkeys(args.turn_detection))
    labels = {t: mode_label(t, args.silence_ms, args.eagerness) for t in turns}
    questions = QUALITY[:args.questions] if args.questions else list(QUALITY)
    speech = [await asyncio.to_thread(speak, q, 24_000) for q, _ in questions]
    warm_up = await asyncio.to_thread(speak, WARM_UP, 24_000)
    tools = not args.no_tools
    cases = tool_calls.select_cases(None, args.tool_cases) if tools else []
    tool_speech = await tool_calls.case_speech(cases)
    tool_extra: dict[str, Any] = {"tool_choice": "auto"}

    results: dict[str, dict[str, Any]] = {}
    for model in args.models:
        if not await tool_calls.installed(model):
            continue
        print(f"{model}: {len(questions)} questions x {len(turns)} modes over WebRTC", flush=True)
        result: dict[str, Any] = {}
        try:  # a server that does not start fails its model, not the models measured before it
            result["quality"] = await quality(model, questions, speech, warm_up, turns, args.silence_ms)
            if tools:
                print(f"{model}: {len(cases)} tool-call cases", flush=True)
                result["tools"] = await tool_calls.run_model(model, cases, tool_speech, args.timeout, tool_extra)
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{model}: FAILED {result['error'][:2000]}", flush=True)
        results[model] = result

    summaries = {m: summarize(r, turns, len(questions)) for m, r in results.items() if "error" not in r}
    print_table(summaries, turns, labels, tools)
    chosen, why = pick(summaries, args.margin, tools)
    print(f"\npick: {chosen or '-'} ({why})")
    dest = ROOT / "bench" / "results" / f"model_choice-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({
        "cpu_count": os.cpu_count(), "llm_threads": os.environ.get("OPENREALTIME_LLM_THREADS"),
        "turn_detection": turns, "silence_ms": args.silence_ms, "eagerness": args.eagerness,
        "instructions": INSTRUCTIONS, "questions": [{"question": q, "accepted": p} for q, p in questions],
        "tool_case_ids": [c.id for c in cases], "tool_session": tool_extra if tools else None,
        "margin": args.margin, "pick": chosen, "pick_rule": why,
        "summary": summaries, "models": results,
    }, indent=2, default=str))
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
