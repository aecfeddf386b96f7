"""Speech stages under concurrent sessions: TTS first-audio fairness and STT/TTS pool throughput.

``tts``: session A synthesizes a long text (4,000 characters of sentences, like a long answer or a
full ``/v1/audio/speech`` input); session B asks for one short sentence once A's audio is flowing.
Reports B's time to first chunk (and to its last chunk), and A's total time, against B alone.

``stt``: a long file (``--long-s``, 300 s: what ``/v1/audio/transcriptions`` takes up to 600 s of)
is transcribed; another session's ~3 s utterance arrives 0.3 s later. Reports its latency.

``stt-pool`` / ``tts-pool``: pools of ``MODELSxTHREADS`` (``--configs 1x2,1x1,2x1``: one Whisper
model with 2 CTranslate2 threads, ...), compared in interleaved rounds because the box is shared:
single-request latency, then ``--n`` concurrent requests (the same ~3 s utterance, or two
sentences to synthesize) dealt round-robin over the pool's models, each on its own worker thread.
Reports wall time, per-request latency (and first chunk for TTS), and CPU seconds per request.

``--busy`` keeps one core spinning in another process meanwhile, like the LLM generating (one
thread), and reports ``llm_share``: the spinner's speed during the concurrent requests relative
to its speed alone (1.0: the speech work cost it nothing).
Prints one table (a row per case) and appends JSON lines to bench/results/speech_fairness.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrealtime.backends.piper_tts import PiperTTS  # noqa: E402
from openrealtime.backends.whisper_stt import WhisperSTT  # noqa: E402
from tests.audio_fixtures import speak  # noqa: E402

SENTENCES = [
    "The capital of France is Paris, a city on the river Seine.",
    "It has been the center of French politics for many centuries.",
    "Millions of visitors come every year to see its museums and monuments.",
    "The city is also famous for its food, its cafes and its long summer evenings.",
    "Many people think it is one of the most beautiful cities in the world.",
]
SHORT = "Sure, I can help with that."
UTTERANCE = "Could you tell me what the weather will be like tomorrow in Berlin, please?"


def long_text(chars: int = 4000) -> str:
    out: list[str] = []
    while sum(map(len, out)) + len(out) < chars:
        out.append(SENTENCES[len(out) % len(SENTENCES)])
    return " ".join(out)


async def tts_fairness(tts: PiperTTS, runs: int) -> dict[str, Any]:
    async def timed(text: str, t0: float) -> tuple[float, float, int]:
        first = 0.0
        size = 0
        async for chunk in tts.synthesize(text, voice="joe"):
            if not first:
                first = time.monotonic() - t0
            size += len(chunk)
        return first, time.monotonic() - t0, size

    async def a_side(text: str, t0: float, started: asyncio.Event) -> tuple[float, float, int]:
        first = 0.0
        size = 0
        async for chunk in tts.synthesize(text, voice="joe"):
            if not first:
                first = time.monotonic() - t0
                started.set()
            size += len(chunk)
        return first, time.monotonic() - t0, size

    alone = [(await timed(SHORT, time.monotonic()))[0] for _ in range(3)]
    rows = []
    text = long_text()
    for _ in range(runs):
        started = asyncio.Event()
        a = asyncio.create_task(a_side(text, time.monotonic(), started))
        await started.wait()
        await asyncio.sleep(0.3)  # B arrives while A is mid-way through a sentence
        b_first, b_total, _ = await timed(SHORT, time.monotonic())
        _, a_total, a_size = await a
        rows.append({"b_first_s": b_first, "b_total_s": b_total, "a_total_s": a_total,
                     "a_audio_s": a_size / 2 / tts.sample_rate})
    return {"case": "tts_fairness", "b_alone_first_s": statistics.median(alone),
            "b_first_s": statistics.median(r["b_first_s"] for r in rows),
            "b_total_s": statistics.median(r["b_total_s"] for r in rows),
            "a_total_s": statistics.median(r["a_total_s"] for r in rows),
            "a_audio_s": rows[0]["a_audio_s"], "runs": rows}


async def stt_fairness(stt: WhisperSTT, runs: int, long_s: float) -> dict[str, Any]:
    """A long file (``long_s`` seconds of varied speech) is transcribed; a ~3 s utterance arrives
    0.3 s later. Reports the utterance's latency against its latency alone, and the file's."""
    short = speak(UTTERANCE, 16000)
    audio = b"".join(speak(s, 16000) + bytes(16000 * 3) for s in SENTENCES)
    while len(audio) < long_s * 32000:
        audio += audio
    audio = audio[:int(long_s * 32000)]

    async def timed(pcm: bytes, t0: float) -> float:
        async for _ in stt.transcribe(pcm):
            pass
        return time.monotonic() - t0

    alone = [await timed(short, time.monotonic()) for _ in range(3)]
    rows = []
    for _ in range(runs):
        long = asyncio.create_task(timed(audio, time.monotonic()))
        await asyncio.sleep(0.3)
        short_s = await timed(short, time.monotonic())
        rows.append({"short_s": short_s, "long_s": await long})
    return {"case": "stt_fairness", "threads": stt.cpu_threads, "audio_s": long_s,
            "short_alone_s": statistics.median(alone),
            "short_s": statistics.median(r["short_s"] for r in rows),
            "long_total_s": statistics.median(r["long_s"] for r in rows), "runs": rows}


class Spinner:
    """A process spinning on one core (the LLM generating), counting its loops to show what it lost."""

    def __init__(self) -> None:
        self.count = multiprocessing.Value("Q", 0, lock=False)
        self.proc = multiprocessing.Process(target=_spin, args=(self.count,), daemon=True)
        self.proc.start()

    def rate(self, seconds: float = 1.0) -> float:
        before = self.count.value
        time.sleep(seconds)
        return (self.count.value - before) / seconds

    def stop(self) -> None:
        self.proc.terminate()


def _spin(count: Any) -> None:
    while True:
        for _ in range(10000):
            pass
        count.value += 1


Config = tuple[int, int]  # (models in the pool, threads per model)


async def pool_matrix(stage: str, configs: list[Config], n: int, reps: int, spinner: Spinner | None
                      ) -> list[dict[str, Any]]:
    """Interleaved over ``reps`` rounds (the box is shared): single-request latency, then ``n``
    concurrent requests dealt round-robin over the pool; wall time, latencies, CPU seconds."""
    pools: dict[Config, list[Any]] = {}
    for size, threads in configs:
        models: list[Any] = [WhisperSTT(cpu_threads=threads) if stage == "stt" else PiperTTS(threads=threads)
                             for _ in range(size)]
        for m in models:
            await m.warmup()
        pools[(size, threads)] = models
    pcm = speak(UTTERANCE, 16000)
    text = " ".join(SENTENCES[:2])

    async def one(model: Any, t0: float) -> tuple[float, float]:
        first = 0.0
        if stage == "stt":
            async for _ in model.transcribe(pcm):
                pass
        else:
            async for _ in model.synthesize(text, voice="joe"):
                first = first or time.monotonic() - t0
        return first, time.monotonic() - t0

    base_rate = spinner.rate() if spinner else 0.0
    stats: dict[Config, dict[str, list[float]]] = {c: {} for c in configs}
    rng = random.Random(0)
    for _ in range(reps):
        order = list(configs)
        rng.shuffle(order)
        for config in order:
            models = pools[config]
            rec = stats[config]
            for _ in range(2):
                first, total = await one(models[0], time.monotonic())
                rec.setdefault("single_s", []).append(total)
                rec.setdefault("single_first_s", []).append(first)
            before = spinner.count.value if spinner else 0
            cpu0, t0 = time.process_time(), time.monotonic()
            got = await asyncio.gather(*(one(models[i % len(models)], t0) for i in range(n)))
            wall = time.monotonic() - t0
            rec.setdefault("cpu_per_request_s", []).append((time.process_time() - cpu0) / n)
            rec.setdefault("wall_s", []).append(wall)
            rec.setdefault("latency_s", []).extend(total for _, total in got)
            rec.setdefault("first_s", []).extend(first for first, _ in got)
            if spinner:
                rec.setdefault("llm_share", []).append((spinner.count.value - before) / wall / base_rate)
    rows = []
    for (size, threads), rec in stats.items():
        row: dict[str, Any] = {"case": f"{stage}_pool", "pool": size, "threads": threads, "n": n, "reps": reps}
        for key, values in rec.items():
            row[key] = statistics.median(values)
        row["max_latency_s"] = max(rec["latency_s"])
        row["mean_latency_s"] = statistics.mean(rec["latency_s"])
        if stage == "stt":
            row.pop("single_first_s")
            row.pop("first_s")
        rows.append(row)
    for models in pools.values():
        for m in models:
            await m.close()
    return rows


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    spinner = Spinner() if args.busy else None
    try:
        if args.case == "tts":
            tts = PiperTTS(threads=args.tts_threads)
            await tts.warmup()
            rows = [await tts_fairness(tts, args.runs)]
            await tts.close()
            return rows
        if args.case == "stt":
            stt = WhisperSTT(cpu_threads=args.stt_threads)
            await stt.warmup()
            rows = [await stt_fairness(stt, args.runs, args.long_s)]
            await stt.close()
            return rows
        configs: list[Config] = []
        for spec in args.configs.split(","):
            size, threads = spec.split("x")
            configs.append((int(size), int(threads)))
        return await pool_matrix(args.case.split("-")[0], configs, args.n, args.runs, spinner)
    finally:
        if spinner:
            spinner.stop()


def print_table(rows: list[dict[str, Any]]) -> None:
    """One table: a row per case, a column per field any case reports ("-" where it has none)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["tts", "stt", "stt-pool", "tts-pool"])
    parser.add_argument("--long-s", type=float, default=300.0, help="seconds of the long file (stt)")
    parser.add_argument("--runs", type=int, default=3, help="runs (tts) or interleaved rounds (pools)")
    parser.add_argument("--n", type=int, default=4, help="concurrent requests (pools)")
    parser.add_argument("--configs", default="1x2,1x1,2x1",
                        help="pools to compare: MODELSxTHREADS, comma-separated")
    parser.add_argument("--tts-threads", type=int, default=1, help="Piper threads (tts)")
    parser.add_argument("--stt-threads", type=int, default=1, help="CTranslate2 threads (stt)")
    parser.add_argument("--busy", action="store_true", help="keep one core spinning meanwhile (the LLM)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    rows = asyncio.run(main(args))
    results = ROOT / "bench" / "results" / "speech_fairness.jsonl"
    summaries = []
    with results.open("a", encoding="utf-8") as fh:
        for row in rows:
            row.update(label=args.label, busy=args.busy, load=round(os.getloadavg()[0], 2))
            summaries.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "runs"})
            fh.write(json.dumps(row) + "\n")
    print_table(summaries)
