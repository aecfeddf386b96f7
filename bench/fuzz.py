"""The long fuzz run: 100,000+ hostile client events over WebSocket sessions against a real server.

The same generators and checks as tests/e2e/test_fuzz.py (tests/fuzz_events.py), for far longer
than CI can afford: `--sessions` sessions, `--concurrency` at a time, share `--events` between them.
Each session runs hypothesis-drawn plans back to back (deleting its items between plans, so
prompts stay small), then a normal text turn. A heartbeat session measures the longest stall of
the server's event loop. Prints one table; writes bench/results/fuzz.json.

    .venv/bin/python bench/fuzz.py [--events 100000] [--sessions 20] [--concurrency 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.e2e.conftest import start_server, stop_server  # noqa: E402
from tests.fuzz_events import RESET, Frame, FuzzSession, Heartbeat, SessionReport, session_plan, ws_url  # noqa: E402


def draw_plans(count: int, seed_value: int, max_frames: int) -> list[list[Frame]]:
    """`count` session plans, the same ones for the same seed (hypothesis run as a generator)."""
    plans: list[list[Frame]] = []

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(session_plan(min_frames=max_frames // 2, max_frames=max_frames, max_responses=1, max_len=100_000,
                        max_depth=5000, llm_text=24))
    def collect(plan: list[Frame]) -> None:
        plans.append(plan)

    while len(plans) < count:  # hypothesis may stop early once it has seen enough distinct plans
        before = len(plans)
        collect()
        if len(plans) == before:
            break
    return plans[:count]


def split(plans: list[list[Frame]], sessions: int, events: int) -> list[list[Frame]]:
    """Deal plans out to sessions until each has its share of events; RESET between plans."""
    per_session = -(-events // sessions)
    out: list[list[Frame]] = [[] for _ in range(sessions)]
    it = itertools.cycle(plans)
    for frames in out:
        while len(frames) < per_session:
            frames.extend([*next(it), Frame(RESET, "ok")])
    return out


async def run(base_ws: str, key: str, work: list[list[Frame]], concurrency: int) -> list[SessionReport]:
    limit = asyncio.Semaphore(concurrency)
    done = 0

    async def one(i: int, frames: list[Frame]) -> SessionReport:
        nonlocal done
        async with limit:
            report = await FuzzSession(ws_url(base_ws), key, f"b{i}", vad=i % 2 == 1,
                                       response_wait_s=300).run(frames)
        done += 1
        print(f"  session {i}: {report.events_sent} events, {len(report.problems)} problems "
              f"({done}/{len(work)} done)", flush=True)
        return report

    return await asyncio.gather(*(one(i, frames) for i, frames in enumerate(work)))


_PROBES = ("sync", "sentinel", "reset", "setup", "final")


def category(problem: str) -> str:
    """A problem's kind: its text up to the first colon; schema failures also name the field."""
    head, _, rest = problem.partition(": ")
    if head.startswith("schema failure"):
        head += " at " + rest.split(":")[0].split(" ")[0]
    return head[:120]


def summarize(reports: list[SessionReport], worst_stall_s: float, tracebacks: int,
              elapsed_s: float) -> tuple[dict[str, Any], Counter[str], dict[str, str]]:
    """The table's rows, broken promises by kind, and the first example of each kind."""
    problems: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for report in reports:
        for problem in report.problems:
            problems[category(problem)] += 1
            examples.setdefault(category(problem), problem[:2000])
    counted = sum(r.server_errors + r.schema_failures + (r.died is not None) for r in reports)
    totals: dict[str, Any] = {
        "events sent": sum(r.events_sent for r in reports),
        "  of which probes (sync, reset, setup, final turn)": sum(
            n for r in reports for kind, n in r.kinds.items() if kind in _PROBES),
        "errors received": sum(r.errors for r in reports),
        "server_errors": sum(r.server_errors for r in reports),
        "schema failures": sum(r.schema_failures for r in reports),
        "sessions that died": sum(r.died is not None for r in reports),
        "responses created": sum(r.responses_created for r in reports),
        "responses done": sum(r.responses_done for r in reports),
        "final normal turn ok": f"{sum(r.final_status in ('completed', 'incomplete') for r in reports)}"
                                f"/{len(reports)}",
        "other broken promises": sum(problems.values()) - counted,
        "largest prompt (tokens)": max((t for r in reports for t in r.input_tokens), default=0),
        "worst event-loop stall (s)": round(worst_stall_s, 2),
        "tracebacks in server log": tracebacks,
        "run time (s)": round(elapsed_s),
    }
    return totals, problems, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="hostile events in all (default 100000)")
    parser.add_argument("--sessions", type=int, default=20, help="WebSocket sessions (default 20)")
    parser.add_argument("--concurrency", type=int, default=4, help="sessions at once (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-frames", type=int, default=60, help="frames per hypothesis plan (default 60)")
    args = parser.parse_args()

    t0 = time.monotonic()
    # A plan averages about half of max_frames plus its bursts; draw with margin.
    plans = draw_plans(args.events * 3 // args.max_frames + args.sessions, args.seed, args.max_frames)
    work = split(plans, args.sessions, args.events)
    print(f"drew {len(plans)} plans in {time.monotonic() - t0:.0f} s; starting the server", flush=True)
    server = start_server(name="bench-fuzz")
    try:
        t1 = time.monotonic()
        with Heartbeat(ws_url(server.ws_url), server.api_key) as beat:
            reports = asyncio.run(run(server.ws_url, server.api_key, work, args.concurrency))
        elapsed = time.monotonic() - t1
    finally:
        stop_server(server)
    log = server.log_text()
    totals, problems, examples = summarize(reports, beat.worst_s, log.count("Traceback"), elapsed)
    width = max(map(len, totals))
    print(f"\nfuzz: {len(reports)} sessions, {args.concurrency} at a time, seed {args.seed}")
    print(f"| {'':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in totals.items():
        print(f"| {name:<{width}} | {value} |")
    if problems:
        print("\nbroken promises by kind (first example of each in the JSON):")
        for category, n in problems.most_common():
            print(f"  {n:6d}  {category}")
    kinds: Counter[str] = Counter()
    for report in reports:
        kinds.update(report.kinds)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps({
        "args": vars(args), "totals": totals, "problems": dict(problems.most_common()), "examples": examples,
        "frames_by_kind": dict(kinds.most_common()), "heartbeat_rtts": len(beat.rtts),
    }, indent=2, ensure_ascii=False))
    print(f"\nwrote {out / 'fuzz.json'}")


if __name__ == "__main__":
    main()
