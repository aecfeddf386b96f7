"""Concurrency: N simultaneous voice calls (or text sessions) against one server; what does each get?

Voice mode (default): starts the real server once (offline stack, `--model`, default qwen2.5-1.5b),
warms it up with one turn, then for each N in `--n` opens N WebRTC calls at once (aiortc peers, Opus
both ways, server_vad). Every call speaks a different question from bench/voice_latency.py in real
time; all calls start each of their `--turns` turns at the same moment (a barrier), so their speech
and their replies overlap. Measured at the client, per N:

- end of user speech -> first audible reply frame (voice_latency's TimedMic and AUDIBLE_RMS), p50/p95;
- outgoing frame pacing while a reply plays (from its first to its last audible frame): the p95 gap
  between consecutive received audio frames (20 ms when paced perfectly), and received audio seconds
  per wall second (1.0 = real time; below 1.0 the server skipped frames because it fell behind);
  the longest silent run inside a reply (a TTS underrun shows as silence, not as missing frames);
  and the server's own count (its /metrics) of outgoing frames sent late and of frame slots it
  skipped after a stall: with both near 0 a reply heard slower than real time lagged in the client;
- refused calls (POST /v1/realtime/calls answered 429/503) and failed turns (no `response.done`, or
  no audible reply, within `--turn-timeout`; a call stops after its first failed turn and its
  remaining turns count as failed too);
- server CPU seconds per completed turn: utime+stime (+ reaped children) of the server process tree
  from /proc, read before the calls open and after they hung up, divided by turns completed (so it
  includes connection setup and idle media of the calls);
- the server's own `turn-timing` waterfall (voice_latency.server_marks), medians in ms from the end
  of user speech.

Text mode (`--text`): N concurrent WebSocket sessions (openai SDK), each sending a text question with
`output_modalities: ["text"]` and `--max-tokens` per turn, all `response.create`s at the same moment:
`response.create` -> first text delta p50/p95, and aggregate LLM tokens/s (the sum of response.done
`usage.output_tokens` over the wall time from the first request to the last `response.done` of each
round, summed over rounds).

The client runs on the same machine (N aiortc peers encode and decode Opus in this process); its own
CPU seconds are reported next to the server's, so a saturated client is visible. Prints one table;
writes JSON to bench/results/concurrency-<timestamp>.json (or `--json PATH`).

    .venv/bin/openrealtime models install qwen2.5-1.5b   # once, if the model is not installed yet
    .venv/bin/python bench/concurrency.py [--n 1 2 4 8 16] [--model qwen2.5-1.5b] [--turns 2]
    .venv/bin/python bench/concurrency.py --text [--n 1 2 4 8 16 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.text_latency import Timing, turn_events  # noqa: E402
from bench.voice_latency import (  # noqa: E402
    AUDIBLE_RMS,
    QUESTIONS,
    STAGES,
    TimedMic,
    median,
    session_config,
    speak_48,
    trailing_ms,
    turn_row,
)
from tests.audio_fixtures import speak  # noqa: E402
from tests.e2e.conftest import Server, client, start_server, stop_server  # noqa: E402
from tests.e2e.webrtc_client import Peer, answer_of, hangup, post_offer  # noqa: E402
from tests.metrics_text import Key, parse, total  # noqa: E402

SILENCE_MS = 500  # server_vad silence_duration_ms
REFUSED = (429, 503)
WARM_UP = ["Hello, can you hear me?"]  # not one of QUESTIONS: no reply is cached from the warm-up
# Text mode asks for long answers, so every response decodes up to max_output_tokens (a fixed amount of work).
TEXT_INSTRUCTIONS = "You are a helpful assistant. Answer in detail, in at least five full sentences."
WATERFALL = ["stt_done", "llm_first_token", "tts_first_chunk", "audio_out"]  # the columns printed


# ---------------------------------------------------------------------------------------------- measuring


def asked(questions: list[str], index: int, turns: int) -> list[str]:
    """What session `index` asks, turn by turn: neighbours ask different questions at the same moment."""
    return [questions[(index + t) % len(questions)] for t in range(turns)]


def cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime of `pid` and its live descendants (/proc/<pid>/stat), in seconds."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = fields
            parents[int(entry)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    # after "comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    ticks = sum(sum(int(x) for x in stats[p][11:15]) for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def scrape(server: Server) -> dict[Key, float]:
    """GET /metrics, parsed (raises httpx.HTTPError, or ValueError for an exposition it cannot read)."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {server.api_key}"})
    response.raise_for_status()
    return parse(response.text)


async def live_sessions(server: Server) -> float:
    return total(await scrape(server), "openrealtime_sessions_active")


async def pacing_counters(server: Server) -> tuple[float, float] | None:
    """The server's own count of outgoing WebRTC frames sent late and frame slots skipped after a
    stall (so a reply heard slower than real time can be told apart from a client that lagged)."""
    try:
        samples = await scrape(server)
    except (httpx.HTTPError, ValueError):
        return None
    return (total(samples, "openrealtime_audio_frames_late_total"),
            total(samples, "openrealtime_audio_frames_dropped_total"))


async def settle(server: Server, wait_s: float = 15) -> float | None:
    """Wait until the server reports no live sessions (the next N starts from zero); how many are left
    (None if GET /metrics did not answer in the shape tests/metrics_text.py reads)."""
    deadline = time.monotonic() + wait_s
    try:
        left = await live_sessions(server)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            left = await live_sessions(server)
    except (httpx.HTTPError, ValueError):
        return None
    return left


def playback(heard: list[Any], after: float) -> tuple[dict[str, Any], list[float]]:
    """Pacing of one reply: the frames from its first to its last audible frame arriving after `after`."""
    audible = [i for i, h in enumerate(heard) if h.at > after and h.rms > AUDIBLE_RMS]
    if len(audible) < 2:
        return {"first_audible_at": heard[audible[0]].at if audible else None}, []
    span = heard[audible[0]:audible[-1] + 1]
    gaps = [(b.at - a.at) * 1000 for a, b in itertools.pairwise(span)]
    wall_s = span[-1].at - span[0].at
    audio_s = sum(h.ms for h in span[1:]) / 1000
    silent_run = longest = 0.0
    for h in span:
        silent_run = silent_run + h.ms if h.rms <= AUDIBLE_RMS else 0.0
        longest = max(longest, silent_run)
    return {"first_audible_at": span[0].at, "reply_audio_s": audio_s, "reply_wall_s": wall_s,
            "realtime_ratio": audio_s / wall_s, "frame_gap_p95_ms": pct(gaps, 95), "frame_gap_max_ms": max(gaps),
            "longest_silence_ms": longest}, gaps


# ---------------------------------------------------------------------------------------------- voice mode


@dataclass
class Call:
    index: int
    peer: Peer | None = None
    mic: TimedMic = field(default_factory=TimedMic)
    call_id: str = ""
    status: int | None = None  # HTTP status of POST /v1/realtime/calls
    error: str | None = None
    turns: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


async def open_bench_call(server: Server, index: int) -> Call:
    """POST the offer; a 429/503 is a refusal, not an error. Then session.update (server_vad)."""
    call = Call(index)
    peer = Peer(mic=call.mic, record=True, validate=False)  # the Node zod round trip would block the loop
    try:
        response = await post_offer(server, "sdp", await peer.offer())
        call.status = response.status_code
        if response.status_code in REFUSED:
            await peer.close()
            return call
        call.call_id, sdp = answer_of("sdp", response)
        await peer.connect(sdp)
        assert (await peer.next_event())["type"] == "session.created"
        peer.send({"type": "session.update", "session": session_config(SILENCE_MS)})
        await peer.collect("session.updated", wait_s=30)
    except Exception as exc:
        call.error = f"{type(exc).__name__}: {exc}"[:300]
        await peer.close()
        return call
    call.peer = peer
    return call


async def voice_turn(call: Call, question: str, speech48: bytes, timeout_s: float) -> dict[str, Any]:
    peer, mic = call.peer, call.mic
    assert peer is not None
    row: dict[str, Any] = {"call": call.index, "question": question, "failed": None}
    peer.heard.clear()  # the recorder appends to this list; keep only this turn's frames
    mic.utter(speech48, trailing_ms=trailing_ms(SILENCE_MS, "server_vad"))
    try:
        done = (await peer.collect("response.done", wait_s=timeout_s))[-1]["response"]
        row.update(response=done["id"], status=done["status"])
        await peer.collect("output_audio_buffer.stopped", wait_s=timeout_s)
    except TimeoutError:
        row["failed"] = "timeout"
    row["speech_end_at"] = mic.speech_end_at
    if mic.speech_end_at:
        stats, gaps = playback(peer.heard, mic.speech_end_at)
        row.update(stats)
        call.gaps += gaps
    if not row["failed"] and "reply_audio_s" not in row:
        row["failed"] = f"no audible reply (status {row.get('status')})"
    return row


async def run_call(call: Call, questions: list[str], barrier: asyncio.Barrier, speech: dict[str, bytes],
                   timeout_s: float) -> None:
    """One turn per question, each started together with the other calls'; stops at the first failed turn."""
    for question in questions:
        await barrier.wait()  # every call waits at every round, failed ones too, or the others would hang
        if call.turns and call.turns[-1]["failed"]:
            call.turns.append({"call": call.index, "question": question, "failed": "call gave up earlier"})
            continue
        try:
            call.turns.append(await voice_turn(call, question, speech[question], timeout_s))
        except Exception as exc:
            call.turns.append({"call": call.index, "question": question, "failed": f"{type(exc).__name__}: {exc}"})
        await asyncio.sleep(0.5)


async def voice_round(server: Server, n: int, turns: int, speech: dict[str, bytes], timeout_s: float,
                      questions: list[str] = QUESTIONS) -> dict:
    cpu0, client0 = cpu_seconds(server.proc.pid), client_cpu_seconds()
    pacing0 = await pacing_counters(server)
    start = time.monotonic()
    calls = await asyncio.gather(*(open_bench_call(server, i) for i in range(n)))
    live = [c for c in calls if c.peer is not None]
    barrier = asyncio.Barrier(max(1, len(live)))
    await asyncio.gather(*(run_call(c, asked(questions, c.index, turns), barrier, speech, timeout_s)
                           for c in live))
    for c in live:
        with contextlib.suppress(httpx.HTTPError):
            await hangup(server, c.call_id)
        assert c.peer is not None
        await c.peer.close()
    left = await settle(server)
    wall = time.monotonic() - start
    cpu, client_cpu = cpu_seconds(server.proc.pid) - cpu0, client_cpu_seconds() - client0
    pacing1 = await pacing_counters(server)
    late = dropped = None
    if pacing0 and pacing1:
        late, dropped = pacing1[0] - pacing0[0], pacing1[1] - pacing0[1]
    rows = [r for c in calls for r in c.turns]
    for r in rows:  # the server's waterfall, read from its log once the calls are over
        if r.get("response") and r.get("speech_end_at"):
            r.update(turn_row(server, r["response"], r["speech_end_at"], r.get("first_audible_at")))
    ok = [r for r in rows if not r["failed"]]
    v2v = [r["voice_to_voice_ms"] for r in ok]
    gaps = [g for c in calls for g in c.gaps]
    audio, walls = sum(r["reply_audio_s"] for r in ok), sum(r["reply_wall_s"] for r in ok)
    return {
        "n": n, "calls_live": len(live), "refused": sum(c.status in REFUSED for c in calls),
        "call_errors": [c.error for c in calls if c.error],
        "turns_ok": len(ok), "turns_failed": len(rows) - len(ok),
        "v2v_p50_ms": pct(v2v, 50), "v2v_p95_ms": pct(v2v, 95), "v2v_max_ms": max(v2v) if v2v else None,
        "server_cpu_s": cpu, "server_cpu_s_per_turn": cpu / len(ok) if ok else None,
        "client_cpu_s": client_cpu, "wall_s": wall,
        "frame_gap_p95_ms": pct(gaps, 95), "frame_gap_max_ms": max(gaps) if gaps else None,
        "realtime_ratio": audio / walls if walls else None,
        "realtime_ratio_min": min(r["reply_audio_s"] / r["reply_wall_s"] for r in ok) if ok else None,
        "longest_silence_ms_max": max(r["longest_silence_ms"] for r in ok) if ok else None,
        "server_frames_late": late, "server_frames_dropped": dropped,
        "server_waterfall_median_ms": {s: median([r.get(s) for r in ok]) for s in STAGES},
        "sessions_left_after": left,
        "turns": rows,
    }


async def run_voice(server: Server, ns: list[int], turns: int, timeout_s: float) -> list[dict]:
    speech = {q: speak_48(speak(q, 24_000)) for q in [*QUESTIONS, *WARM_UP]}
    warm = await voice_round(server, 1, 1, speech, timeout_s, WARM_UP)  # warms STT, LLM and TTS up
    print(f"warm-up: {fmt(warm['v2v_p50_ms'])} ms to first audible reply", flush=True)
    rows = []
    for n in ns:
        rows.append(await voice_round(server, n, turns, speech, timeout_s))
        print(voice_line(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- text mode


async def text_session(server: Server, index: int, questions: list[str], max_tokens: int,
                       barrier: asyncio.Barrier, timeout_s: float) -> dict[str, Any]:
    """One WebSocket session: `turns` text turns, each `response.create` sent with the others'."""
    out: dict[str, Any] = {"index": index, "status": None, "error": None, "turns": []}
    rounds = 0  # barrier rounds joined: a session that ends early must still join the rest, or the others hang
    try:
        async with client(server).realtime.connect(model="gpt-realtime") as conn:
            for t, question in enumerate(questions):
                events = turn_events(question, max_tokens)
                events[0]["session"]["instructions"] = TEXT_INSTRUCTIONS
                for event in events[:-1] if t == 0 else events[1:-1]:
                    await conn.send(event)  # type: ignore[arg-type]
                rounds += 1
                await barrier.wait()
                timing, row = Timing(), {"question": question, "failed": None}
                timing.sent = time.perf_counter()
                await conn.send(events[-1])  # type: ignore[arg-type]
                try:
                    async with asyncio.timeout(timeout_s):
                        while True:
                            event = (await conn.recv()).to_dict()
                            if event["type"] == "error":
                                row["failed"] = f"error {event['error'].get('code')}"
                                break
                            if timing.on_event(event):
                                row.update(timing.row(), status=event["response"]["status"], sent=timing.sent,
                                           done=timing.done)
                                if not timing.first:
                                    row["failed"] = f"no text delta (status {row['status']})"
                                break
                except TimeoutError:
                    row["failed"] = "timeout"
                out["turns"].append(row)
                if row["failed"]:
                    break
    except Exception as exc:
        response = getattr(exc, "response", None)
        out["status"] = getattr(response, "status_code", None)
        if out["status"] not in REFUSED:
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    for _ in range(len(questions) - rounds):
        await barrier.wait()
    return out


async def text_round(server: Server, n: int, turns: int, max_tokens: int, timeout_s: float,
                     questions: list[str] = QUESTIONS) -> dict:
    cpu0, client0 = cpu_seconds(server.proc.pid), client_cpu_seconds()
    barrier = asyncio.Barrier(n)
    sessions = await asyncio.gather(*(
        text_session(server, i, asked(questions, i, turns), max_tokens, barrier, timeout_s) for i in range(n)))
    left = await settle(server)
    cpu, client_cpu = cpu_seconds(server.proc.pid) - cpu0, client_cpu_seconds() - client0
    rows = [r for s in sessions for r in s["turns"]]
    ok = [r for r in rows if not r["failed"]]
    rounds: dict[int, list[dict]] = {}
    for s in sessions:
        for t, r in enumerate(s["turns"]):
            if not r["failed"]:
                rounds.setdefault(t, []).append(r)
    busy_s = sum(max(r["done"] for r in rs) - min(r["sent"] for r in rs) for rs in rounds.values())
    tokens = sum(r["output_tokens"] for r in ok)
    ttft = [r["ttft_ms"] for r in ok]
    refused = sum(s["status"] in REFUSED for s in sessions)
    return {
        "n": n, "refused": refused, "session_errors": [s["error"] for s in sessions if s["error"]],
        "turns_ok": len(ok), "turns_failed": (n - refused) * turns - len(ok),
        "first_delta_p50_ms": pct(ttft, 50), "first_delta_p95_ms": pct(ttft, 95),
        "output_tokens": tokens, "busy_s": busy_s, "aggregate_tokens_per_s": tokens / busy_s if busy_s else None,
        "per_stream_tokens_per_s_median": median([r["tokens_per_s"] for r in ok]),
        "server_cpu_s": cpu, "server_cpu_s_per_turn": cpu / len(ok) if ok else None, "client_cpu_s": client_cpu,
        "sessions_left_after": left, "turns": rows,
    }


async def run_text(server: Server, ns: list[int], turns: int, max_tokens: int, timeout_s: float) -> list[dict]:
    await text_round(server, 1, 1, 8, timeout_s, WARM_UP)
    rows = []
    for n in ns:
        rows.append(await text_round(server, n, turns, max_tokens, timeout_s))
        print(text_line(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- output


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


VOICE_HEAD = (f"{'N':>3} {'refused':>7} {'ok':>4} {'failed':>6} {'v2v p50':>8} {'v2v p95':>8} {'cpu s/turn':>10} "
              f"{'client cpu s':>12} {'gap p95':>8} {'rt ratio':>8} {'silence max':>11} {'srv late':>8} "
              f"{'srv drop':>8} "
              + " ".join(f"{s:>15}" for s in WATERFALL))
TEXT_HEAD = (f"{'N':>3} {'refused':>7} {'ok':>4} {'failed':>6} {'1st delta p50':>13} {'1st delta p95':>13} "
             f"{'agg tok/s':>9} {'stream tok/s':>12} {'cpu s/turn':>10} {'client cpu s':>12}")


def voice_line(r: dict) -> str:
    w = r["server_waterfall_median_ms"]
    return (f"{r['n']:>3} {r['refused']:>7} {r['turns_ok']:>4} {r['turns_failed']:>6} {fmt(r['v2v_p50_ms']):>8} "
            f"{fmt(r['v2v_p95_ms']):>8} {fmt(r['server_cpu_s_per_turn'], 2):>10} {fmt(r['client_cpu_s'], 1):>12} "
            f"{fmt(r['frame_gap_p95_ms'], 1):>8} {fmt(r['realtime_ratio'], 3):>8} "
            f"{fmt(r['longest_silence_ms_max']):>11} {fmt(r['server_frames_late']):>8} "
            f"{fmt(r['server_frames_dropped']):>8} " + " ".join(f"{fmt(w[s]):>15}" for s in WATERFALL))


def text_line(r: dict) -> str:
    return (f"{r['n']:>3} {r['refused']:>7} {r['turns_ok']:>4} {r['turns_failed']:>6} "
            f"{fmt(r['first_delta_p50_ms']):>13} {fmt(r['first_delta_p95_ms']):>13} "
            f"{fmt(r['aggregate_tokens_per_s'], 1):>9} {fmt(r['per_stream_tokens_per_s_median'], 1):>12} "
            f"{fmt(r['server_cpu_s_per_turn'], 2):>10} {fmt(r['client_cpu_s'], 1):>12}")


def log_problems(server: Server) -> dict[str, int]:
    text = server.log_text()
    return {"tracebacks": text.count("Traceback"), "errors": text.count(" ERROR "),
            "warnings": text.count(" WARNING ")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", help="concurrency levels (default 1 2 4 8 16; text 1 2 4 8 16 32)")
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--turns", type=int, default=2, help="turns per call or session")
    parser.add_argument("--text", action="store_true", help="text-only WebSocket sessions instead of voice calls")
    parser.add_argument("--max-tokens", type=int, default=64, help="text mode: max_output_tokens per response")
    parser.add_argument("--max-sessions", type=int, help="the server's max_sessions (OPENREALTIME_MAX_SESSIONS)")
    parser.add_argument("--turn-timeout", type=float, default=120, help="seconds before a turn counts as failed")
    parser.add_argument("--json", type=Path, help="where to write the results (default bench/results/...)")
    parser.add_argument("--set", nargs="+", default=[], metavar="SETTING=VALUE",
                        help="server settings without the OPENREALTIME_ prefix, e.g. stt_window=full")
    args = parser.parse_args()
    ns = args.n or ([1, 2, 4, 8, 16, 32] if args.text else [1, 2, 4, 8, 16])

    env = {"OPENREALTIME_LLM_MODEL": args.model}
    if args.max_sessions is not None:
        env["OPENREALTIME_MAX_SESSIONS"] = str(args.max_sessions)
    if os.environ.get("OPENREALTIME_LLM_THREADS"):
        env["OPENREALTIME_LLM_THREADS"] = os.environ["OPENREALTIME_LLM_THREADS"]
    for assignment in args.set:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            parser.error(f"--set {assignment!r}: expected SETTING=VALUE")
        env["OPENREALTIME_" + name.strip().upper()] = value.strip()
    server = start_server(env, name="bench-concurrency")
    try:
        if args.text:
            rows = asyncio.run(run_text(server, ns, args.turns, args.max_tokens, args.turn_timeout))
        else:
            rows = asyncio.run(run_voice(server, ns, args.turns, args.turn_timeout))
    finally:
        stop_server(server)
    problems = log_problems(server)

    mode = (f"text, max_output_tokens={args.max_tokens}" if args.text
            else f"voice over WebRTC, server_vad {SILENCE_MS} ms")
    print(f"\nconcurrency, {mode}, {args.model}, {args.turns} turns per session, max_sessions={args.max_sessions}, "
          f"{os.cpu_count()} CPU cores" + (f", {' '.join(args.set)}" if args.set else ""))
    if args.text:
        print("ms from response.create; agg tok/s = all output tokens / time requests were outstanding\n" + TEXT_HEAD)
        for r in rows:
            print(text_line(r))
    else:
        print("ms from the end of user speech; gap = ms between received frames (20 = paced); rt ratio = reply "
              "audio s per wall s; srv late / srv drop = frames the server sent late / slots it skipped (its "
              "/metrics); waterfall = server medians\n" + VOICE_HEAD)
        for r in rows:
            print(voice_line(r))
    print(f"server log: {server.log_path} ({problems})")
    path = args.json or ROOT / "bench" / "results" / f"concurrency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mode": "text" if args.text else "voice", "model": args.model, "turns": args.turns,
                                "max_tokens": args.max_tokens if args.text else None,
                                "max_sessions": args.max_sessions, "cpu_count": os.cpu_count(),
                                "settings": args.set,
                                "server_log": str(server.log_path), "server_log_problems": problems,
                                "rows": rows}, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
