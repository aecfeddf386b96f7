"""Capacity model: how many openrealtime nodes a call volume needs (a SimPy discrete-event simulation).

A model, not a measurement: it replays the per-turn CPU demand measured by bench/concurrency.py on
simulated nodes and reports what callers would see. For each node count in `--nodes` it simulates
the same calls (common random numbers: the same arrivals, call lengths and service-time draws), so
rows differ only by the number of nodes.

- Calls arrive as a Poisson process whose rate follows a profile: `--rate` calls/min with a peak
  of `--peak-factor` x between `--peak-start` and `--peak-end` seconds, or any piecewise-constant
  `--profile "0:6,600:12,1200:6"` (seconds:calls per minute). `--burst N` instead starts N calls at
  t=0 whose turns all end together, like bench/concurrency.py, to compare the model with it.
- Call lengths are lognormal (`--call-dist lognormal`, sigma `--call-sigma`) or exponential, mean
  `--call-mean-s`. Within a call the user's turns end every `--turn-interval-s` on average
  (uniformly 0.5x-1.5x), and never before the previous reply has started playing plus 1 s.
- A node has `--cores` CPU cores, a FIFO queue of CPU jobs served by whichever core is free (SimPy
  Resource). A turn is: the VAD's silence wait (no CPU), then the first-audio path as CPU jobs
  (transcript, prompt evaluation to the first token, decoding to the first clause, TTS first
  chunk), then output and transport delay (no CPU); first-audio latency = end of speech to the
  client hearing the reply. The rest of the turn's CPU (the rest of the reply, speech synthesis,
  Opus and VAD for the call's media, connection setup) is released in `--chunk-s` slices spread
  evenly over the turn interval, so it competes for the same cores. Each CPU demand is the measured
  figure times a lognormal factor (`--service-cv`).
- Admission: at most `--max-sessions` live calls per node. The router sends a new call to the next
  node, round robin, that is up, out of the balancer's rotation only once its health check failed;
  `--router room` (default) skips nodes that are full (a balancer that retries a 429 on another
  node, or routes by the node registry's active/max sessions), `--router roundrobin` does not (a
  full node refuses: 429 `session_limit_reached`, like plain HAProxy round robin, where `/readyz`
  stays 200 at max_sessions). A call that finds no node is refused.
- Node loss: `--fail-at T` kills node `--fail-node` at T s; its live calls drop (counted), and for
  `--detect-s` s (health-check interval x fall count) the balancer still sends calls to it, which
  are refused.

Defaults come from the repository's own measurements (bench/results/concurrency-20261201-143442.json,
the "after" run of README's "Many callers on one box": qwen2.5-1.5b, WebRTC, server_vad 500 ms, this
project's 2-core machine); each is named in DEFAULTS_SOURCE and written to the JSON.
`--from-json bench/results/concurrency-<timestamp>.json` takes them from another voice run instead
(stage times from its lowest-N row's server waterfall, CPU per turn = all server CPU seconds / all
completed turns over its rows).

Redis operations per second are counted from the simulated events with the multi-node design's
costs (docs/deploy.md): per call a claim and a release, one registry refresh per live call per
heartbeat (one pipeline per node), per node heartbeat SET + SADD, per turn 2 EVALSHA when rate
limits are on, per call 1 SET + 1 GET when sessions start from an ephemeral key.

Prints one table; writes JSON to bench/results/capacity_sim-<timestamp>.json (or `--json PATH`).

    .venv/bin/python bench/capacity_sim.py [--nodes 1 2 4 8] [--rate 6] [--seed 1]
    .venv/bin/python bench/capacity_sim.py --nodes 40 50 60 --rate 100 --peak-factor 1 --duration 1200
    .venv/bin/python bench/capacity_sim.py --nodes 4 --fail-at 900 --fail-node 0
    .venv/bin/python bench/capacity_sim.py --burst 4 --nodes 1 --max-sessions 16
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import simpy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE_JSON = "bench/results/concurrency-20261201-143442.json"

# First-audio path of one turn on an idle node, seconds, from the N=1 row of DEFAULT_SOURCE_JSON
# (`server_waterfall_median_ms`, ms after the end of user speech: speech_stopped 512, stt_done 669,
# llm_first_token 1158, first_clause 1920, tts_first_chunk 2053, audio_out 2064; v2v_p50_ms 2216).
STAGES = ("stt", "llm_prefill", "llm_first_clause", "tts_first_chunk")
DEFAULTS: dict[str, float] = {
    "vad_wait_s": 0.512,  # speech_stopped: server_vad's silence wait (500 ms) + VAD; no CPU queue
    "stt": 0.157,  # stt_done - speech_stopped: Whisper tiny.en on the final utterance
    "llm_prefill": 0.489,  # llm_first_token - stt_done: the new part of the prompt, to the first token
    "llm_first_clause": 0.762,  # first_clause - llm_first_token: decoding up to the first clause
    "tts_first_chunk": 0.134,  # tts_first_chunk - first_clause: Piper's first chunk
    "output_s": 0.163,  # (audio_out - tts_first_chunk) + (v2v_p50_ms - audio_out): pacing, Opus, jitter buffer
    # All server CPU seconds / all completed turns over the rows N = 1, 2, 4, 8, 16 of the same run
    # (272.12 s / 62 turns; per row 3.55, 2.94, 5.05, 5.75, 3.78). Includes each call's setup and
    # idle media, for calls of ~6 s per turn.
    "cpu_per_turn_s": 4.389,
}
DEFAULTS_SOURCE = {
    "source_json": DEFAULT_SOURCE_JSON,
    "stages": "N=1 row, server_waterfall_median_ms differences (see DEFAULTS in bench/capacity_sim.py)",
    "cpu_per_turn_s": "sum(server_cpu_s) / sum(turns_ok) over all rows",
    "cores": "cpu_count of that run (2)",
    "max_sessions": "README: 'set max_sessions to about 4 on a machine like this'",
}

RESULTS_FIELDS = ("nodes", "calls_offered", "calls_admitted", "calls_refused", "refusal_rate", "calls_dropped",
                  "calls_completed", "turns", "first_audio_p50_ms", "first_audio_p95_ms", "first_audio_max_ms",
                  "turns_after_failure", "cpu_utilisation", "peak_live_calls", "redis_ops_per_s",
                  "redis_ops_per_s_per_call")


# ---------------------------------------------------------------------------------------------- inputs


def defaults_from_json(path: Path) -> dict[str, float]:
    """Per-turn demands from a bench/concurrency.py voice JSON (see the module docstring)."""
    data = json.loads(path.read_text())
    if data.get("mode") != "voice":
        raise SystemExit(f"{path}: not a voice run of bench/concurrency.py (mode={data.get('mode')!r})")
    rows = [r for r in data.get("rows", []) if r.get("turns_ok") and r.get("server_waterfall_median_ms")]
    if not rows:
        raise SystemExit(f"{path}: no row with completed turns and a server waterfall")
    low = min(rows, key=lambda r: r["n"])
    w = {k: v / 1000 for k, v in low["server_waterfall_median_ms"].items() if v is not None}
    need = ("speech_stopped", "stt_done", "llm_first_token", "first_clause", "tts_first_chunk", "audio_out")
    if any(k not in w for k in need) or low.get("v2v_p50_ms") is None:
        raise SystemExit(f"{path}: the N={low['n']} row lacks one of {need} or v2v_p50_ms")
    cpu = sum(r["server_cpu_s"] for r in rows) / sum(r["turns_ok"] for r in rows)
    return {
        "vad_wait_s": w["speech_stopped"],
        "stt": w["stt_done"] - w["speech_stopped"],
        "llm_prefill": w["llm_first_token"] - w["stt_done"],
        "llm_first_clause": w["first_clause"] - w["llm_first_token"],
        "tts_first_chunk": w["tts_first_chunk"] - w["first_clause"],
        "output_s": low["v2v_p50_ms"] / 1000 - w["tts_first_chunk"],
        "cpu_per_turn_s": cpu,
    }


def parse_profile(text: str) -> list[tuple[float, float]]:
    """ "0:6,600:12" -> [(0, 0.1), (600, 0.2)]: from each start (s), calls per second."""
    steps = []
    for part in text.split(","):
        start, rate = part.split(":")
        steps.append((float(start), float(rate) / 60))
    steps.sort()
    if not steps or steps[0][0] > 0:
        steps.insert(0, (0.0, 0.0))
    return steps


def rate_at(profile: list[tuple[float, float]], t: float) -> float:
    rate = 0.0
    for start, r in profile:
        if t >= start:
            rate = r
    return rate


@dataclass(slots=True)
class CallPlan:
    """One caller, drawn once and replayed for every node count."""

    index: int
    arrival: float
    length_s: float
    seed: int  # for the call's own draws (turn gaps, service factors)
    aligned: bool = False  # --burst: turns at exact multiples of the interval


def plan_calls(args: argparse.Namespace) -> list[CallPlan]:
    rng = random.Random(args.seed)
    if args.burst:
        # Each call makes exactly --burst-turns turns, however late its replies come.
        return [CallPlan(i, 0.0, math.inf, rng.getrandbits(32), aligned=True) for i in range(args.burst)]
    profile = args.profile_steps
    peak = max(r for _, r in profile)
    calls: list[CallPlan] = []
    t = 0.0
    if peak <= 0:
        return calls
    while True:  # thinning: candidates at the peak rate, kept with probability rate(t) / peak
        t += rng.expovariate(peak)
        if t >= args.duration:
            return calls
        if rng.random() * peak > rate_at(profile, t):
            continue
        if args.call_dist == "exponential":
            length = rng.expovariate(1 / args.call_mean_s)
        else:  # lognormal with the given mean
            mu = math.log(args.call_mean_s) - args.call_sigma ** 2 / 2
            length = rng.lognormvariate(mu, args.call_sigma)
        calls.append(CallPlan(len(calls), t, max(length, 1.0), rng.getrandbits(32)))


# ---------------------------------------------------------------------------------------------- model


@dataclass(eq=False)
class Node:
    index: int
    cpu: simpy.Resource
    cores: int
    max_sessions: int | None
    up: bool = True
    in_rotation: bool = True
    down_at: float | None = None
    busy_s: float = 0.0
    live: dict = field(default_factory=dict)  # call process -> when it started


@dataclass
class Stats:
    offered: int = 0
    admitted: int = 0
    refused: int = 0
    dropped: int = 0
    completed: int = 0
    latencies: list[float] = field(default_factory=list)
    turns: int = 0
    turns_after_failure: int = 0  # replies heard after --fail-at (the surviving nodes go on)
    peak_live: int = 0
    live: int = 0
    claims: int = 0
    releases: int = 0
    call_refreshes: int = 0
    node_heartbeats: int = 0
    call_seconds: float = 0.0  # live call time, for Redis ops per call-second


class Cluster:
    def __init__(self, env: simpy.Environment, args: argparse.Namespace, demands: dict[str, float], nodes: int):
        self.env, self.args, self.d = env, args, demands
        self.nodes = [Node(i, simpy.Resource(env, capacity=args.cores), args.cores, args.max_sessions)
                      for i in range(nodes)]
        self.stats = Stats()
        self._next = 0
        # CPU per turn outside the first-audio path, released in slices over the turn interval.
        self.rest_s = max(0.0, demands["cpu_per_turn_s"] + args.extra_cpu_per_turn_s
                          - sum(demands[s] for s in STAGES))

    # routing -------------------------------------------------------------------------------------

    def route(self) -> Node | None:
        """The node a new call lands on (None: refused). Round robin over the balancer's rotation."""
        n = len(self.nodes)
        for k in range(n):
            node = self.nodes[(self._next + k) % n]
            if not node.in_rotation:
                continue
            full = node.max_sessions is not None and len(node.live) >= node.max_sessions
            if self.args.router == "roundrobin" or not full:
                self._next = (self._next + k + 1) % n
                return None if (full or not node.up) else node
        return None

    # processes -----------------------------------------------------------------------------------

    def arrivals(self, plans: list[CallPlan]):
        for plan in plans:
            if plan.arrival > self.env.now:
                yield self.env.timeout(plan.arrival - self.env.now)
            self.stats.offered += 1
            node = self.route()
            if node is None:
                self.stats.refused += 1
                continue
            self.stats.admitted += 1
            self.stats.claims += 1
            proc = self.env.process(self.call(node, plan))
            node.live[proc] = self.env.now
            self.stats.live += 1
            self.stats.peak_live = max(self.stats.peak_live, self.stats.live)

    def cpu(self, node: Node, seconds: float):
        with node.cpu.request() as req:
            yield req
            if not node.up:  # a slice queued on a node that has been lost meanwhile
                return
            start = self.env.now
            try:
                yield self.env.timeout(seconds)
            finally:
                node.busy_s += self.env.now - start

    def call(self, node: Node, plan: CallPlan):
        rng = random.Random(plan.seed)
        cv = self.args.service_cv
        sigma = math.sqrt(math.log(1 + cv * cv)) if cv > 0 else 0.0

        def factor() -> float:
            return self.args.demand_scale * (rng.lognormvariate(-sigma * sigma / 2, sigma) if sigma else 1.0)

        interval = self.args.turn_interval_s
        end = self.env.now + plan.length_s
        next_turn = self.env.now + (interval if plan.aligned else interval * rng.uniform(0.5, 1.5))
        turns_left = self.args.burst_turns if plan.aligned else math.inf
        try:
            while next_turn <= end and turns_left > 0:
                turns_left -= 1
                yield self.env.timeout(next_turn - self.env.now)
                speech_end = self.env.now
                yield self.env.timeout(self.d["vad_wait_s"])
                for stage in STAGES:
                    yield from self.cpu(node, self.d[stage] * factor())
                yield self.env.timeout(self.d["output_s"])
                heard = self.env.now
                self.stats.latencies.append(heard - speech_end)
                self.stats.turns += 1
                if self.args.fail_at is not None and heard >= self.args.fail_at:
                    self.stats.turns_after_failure += 1
                self.env.process(self.rest_of_turn(node, self.rest_s * factor(), interval))
                gap = interval if plan.aligned else interval * rng.uniform(0.5, 1.5)
                next_turn = max(speech_end + gap, heard + 1.0)
            if math.isfinite(end) and end > self.env.now:
                yield self.env.timeout(end - self.env.now)
            self.stats.completed += 1
            self.stats.releases += 1
        except simpy.Interrupt:
            self.stats.dropped += 1
        finally:
            started = node.live.pop(self.env.active_process, self.env.now)
            self.stats.call_seconds += self.env.now - started
            self.stats.live -= 1

    def rest_of_turn(self, node: Node, seconds: float, spread_s: float):
        slices = max(1, math.ceil(seconds / self.args.chunk_s))
        each, gap = seconds / slices, spread_s / slices
        for _ in range(slices):
            if not node.up:
                return
            yield from self.cpu(node, each)
            if gap > each:
                yield self.env.timeout(gap - each)

    def heartbeat(self):
        """Counts the registry writes of the design: per node SET+SADD, one refresh per live call."""
        while True:
            yield self.env.timeout(self.args.heartbeat_s)
            for node in self.nodes:
                if node.up:
                    self.stats.node_heartbeats += 1
                    self.stats.call_refreshes += len(node.live)

    def fail(self, index: int, at: float, detect_s: float):
        yield self.env.timeout(at)
        node = self.nodes[index]
        node.up, node.down_at = False, self.env.now
        for proc in list(node.live):
            if proc.is_alive:
                proc.interrupt("node lost")
        yield self.env.timeout(detect_s)
        node.in_rotation = False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def simulate(args: argparse.Namespace, demands: dict[str, float], plans: list[CallPlan], nodes: int) -> dict[str, Any]:
    env = simpy.Environment()
    cluster = Cluster(env, args, demands, nodes)
    arrivals = env.process(cluster.arrivals(plans))
    env.process(cluster.heartbeat())
    if args.fail_at is not None and args.fail_node < nodes:
        env.process(cluster.fail(args.fail_node, args.fail_at, args.detect_s))
    if args.burst:  # until every call has made its turns
        env.run(until=arrivals)
        env.run(until=env.all_of([p for n in cluster.nodes for p in n.live]))
        horizon = env.now
    else:
        horizon = args.duration
        env.run(until=horizon)
    st = cluster.stats
    capacity = sum(n.cores * (n.down_at if n.down_at is not None else horizon) for n in cluster.nodes)
    busy = sum(n.busy_s for n in cluster.nodes)
    ek_ops = 2 * st.admitted if args.ephemeral_keys else 0
    rl_ops = 2 * st.turns if args.rate_limits else 0
    redis_ops = st.claims + st.releases + st.call_refreshes + 2 * st.node_heartbeats + ek_ops + rl_ops
    call_seconds = st.call_seconds + sum(horizon - t for n in cluster.nodes for t in n.live.values())
    p = {q: percentile(st.latencies, q) for q in (50, 95, 100)}
    return {
        "nodes": nodes, "calls_offered": st.offered, "calls_admitted": st.admitted, "calls_refused": st.refused,
        "refusal_rate": st.refused / st.offered if st.offered else 0.0, "calls_dropped": st.dropped,
        "calls_completed": st.completed, "turns": st.turns,
        "turns_after_failure": st.turns_after_failure if args.fail_at is not None else None,
        "first_audio_p50_ms": None if p[50] is None else p[50] * 1000,
        "first_audio_p95_ms": None if p[95] is None else p[95] * 1000,
        "first_audio_max_ms": None if p[100] is None else p[100] * 1000,
        "cpu_utilisation": busy / capacity if capacity else 0.0, "peak_live_calls": st.peak_live,
        "redis_ops_per_s": redis_ops / horizon,
        "redis_ops_per_s_per_call": redis_ops / call_seconds if call_seconds else None,
    }


# ---------------------------------------------------------------------------------------------- output


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


HEAD = (f"{'nodes':>5} {'offered':>7} {'refused':>7} {'refusal':>7} {'dropped':>7} {'turns':>6} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'cpu util':>8} {'peak calls':>10} {'redis ops/s':>11}")


def line(r: dict[str, Any]) -> str:
    return (f"{r['nodes']:>5} {r['calls_offered']:>7} {r['calls_refused']:>7} {r['refusal_rate']:>7.1%} "
            f"{r['calls_dropped']:>7} {r['turns']:>6} {fmt(r['first_audio_p50_ms']):>7} "
            f"{fmt(r['first_audio_p95_ms']):>7} {r['cpu_utilisation']:>8.1%} {r['peak_live_calls']:>10} "
            f"{fmt(r['redis_ops_per_s'], 1):>11}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8], help="node counts to compare")
    p.add_argument("--cores", type=int, default=2, help="CPU cores per node")
    p.add_argument("--max-sessions", type=int, default=4, help="max_sessions per node (0 or less: unlimited)")
    p.add_argument("--duration", type=float, default=1800, help="simulated seconds of arrivals")
    p.add_argument("--rate", type=float, default=6, help="base arrival rate, calls per minute")
    p.add_argument("--peak-factor", type=float, default=2.0, help="rate multiplier during the peak")
    p.add_argument("--peak-start", type=float, default=600, help="peak start, s")
    p.add_argument("--peak-end", type=float, default=1200, help="peak end, s")
    p.add_argument("--profile", help='piecewise-constant rate "START_S:CALLS_PER_MIN,..." (overrides --rate/--peak-*)')
    p.add_argument("--call-dist", choices=["lognormal", "exponential"], default="lognormal")
    p.add_argument("--call-mean-s", type=float, default=120, help="mean call length, s")
    p.add_argument("--call-sigma", type=float, default=0.6, help="lognormal sigma of call lengths")
    p.add_argument("--turn-interval-s", type=float, default=10, help="mean time between a call's turns, s")
    p.add_argument("--service-cv", type=float, default=0.3, help="coefficient of variation of each CPU demand")
    p.add_argument("--demand-scale", type=float, default=1.0, help="multiply every CPU demand (calibration)")
    p.add_argument("--chunk-s", type=float, default=0.5, help="slice of the rest-of-turn CPU work, s")
    p.add_argument("--router", choices=["room", "roundrobin"], default="room",
                   help="room: skip full nodes; roundrobin: a full node refuses the call")
    p.add_argument("--fail-at", type=float, help="kill one node at this time, s")
    p.add_argument("--fail-node", type=int, default=0, help="which node --fail-at kills")
    p.add_argument("--detect-s", type=float, default=6, help="until the balancer's health check takes it out, s")
    p.add_argument("--extra-cpu-per-turn-s", type=float, default=0.0,
                   help="CPU per turn on the node beyond the server's (e.g. the bench client's peers: 2.15)")
    p.add_argument("--burst", type=int, help="N calls at t=0 whose turns end together (bench/concurrency.py)")
    p.add_argument("--burst-turns", type=int, default=2, help="turns per call with --burst")
    p.add_argument("--heartbeat-s", type=float, default=2, help="node_heartbeat_s, for the Redis count")
    p.add_argument("--no-rate-limits", dest="rate_limits", action="store_false",
                   help="count no rate-limit EVALSHAs (limits off)")
    p.add_argument("--no-ephemeral-keys", dest="ephemeral_keys", action="store_false",
                   help="count no ek SET/GET (clients use API keys)")
    p.add_argument("--from-json", type=Path, help="take the demands from a bench/concurrency.py voice JSON")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="where to write the results (default bench/results/...)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Simulate every node count; the whole result as written to JSON."""
    if args.max_sessions is not None and args.max_sessions <= 0:
        args.max_sessions = None
    if args.profile:
        args.profile_steps = parse_profile(args.profile)
    else:
        base = args.rate / 60
        args.profile_steps = [(0.0, base), (args.peak_start, base * args.peak_factor), (args.peak_end, base)]
    demands = defaults_from_json(args.from_json) if args.from_json else dict(DEFAULTS)
    plans = plan_calls(args)
    rows = [simulate(args, demands, plans, n) for n in args.nodes]
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    return {"model": "bench/capacity_sim.py", "seed": args.seed, "params": params, "demands": demands,
            "demands_source": str(args.from_json) if args.from_json else DEFAULTS_SOURCE,
            "fields": list(RESULTS_FIELDS), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    result = run(args)
    d = result["demands"]
    rate = args.profile or f"{args.rate:g}/min, x{args.peak_factor:g} {args.peak_start:g}-{args.peak_end:g} s"
    load = (f"burst of {args.burst} calls x {args.burst_turns} turns" if args.burst else
            f"Poisson arrivals {rate}, {args.call_dist} calls mean {args.call_mean_s:g} s, {args.duration:g} s")
    print(f"\ncapacity model (a simulation, not a measurement): {load}; a turn every {args.turn_interval_s:g} s; "
          f"{args.cores} cores and max_sessions={args.max_sessions} per node; router {args.router}"
          + (f"; node {args.fail_node} lost at {args.fail_at:g} s" if args.fail_at is not None else ""))
    print(f"per turn: {d['cpu_per_turn_s']:.2f} CPU s, first-audio path "
          + " + ".join(f"{d[s] * 1000:.0f}" for s in STAGES)
          + f" ms CPU, +{(d['vad_wait_s'] + d['output_s']) * 1000:.0f} ms waits"
          + (f"; CPU demands x{args.demand_scale:g}" if args.demand_scale != 1 else "")
          + (f"; +{args.extra_cpu_per_turn_s:g} CPU s/turn" if args.extra_cpu_per_turn_s else "")
          + f"; seed {args.seed}")
    print("first audio = end of user speech to the reply heard; refusal = calls refused / offered; "
          "dropped = live calls on a lost node\n" + HEAD)
    for r in result["rows"]:
        print(line(r))
    path = args.json or ROOT / "bench" / "results" / f"capacity_sim-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path} ({time.monotonic() - started:.1f} s)")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
