"""Whisper on a fitted window against the full 30 s one: word error rate and time per utterance.

Every question of the voice and tool-call benches (plus a few longer sentences) is spoken by two
voices (the bundled Piper voice and espeak-ng), clean and mixed into 10 dB babble, with 200 ms of
silence before and 500 ms after (as a voice turn hands it over). Each utterance goes through the
server's own backend (``WhisperSTT``: tiny.en, int8, beam 1, one thread) with ``window="full"``
and with ``window="fit"`` for each padding ladder of ``--pads`` (default: ``3`` alone, and the
backend's default ladder; ``3,8`` tries 3 s of silence after the audio, then 8 s, then the full
window). Prints one table; writes bench/results/stt_window.json.

    .venv/bin/python bench/stt_window.py --pads 3 6 3,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tool_cases import CASES  # noqa: E402
from voice_latency import QUESTIONS  # noqa: E402

from openrealtime.backends.speech import TranscriptDone  # noqa: E402
from openrealtime.backends.whisper_stt import FIT_PADS_S, WhisperSTT  # noqa: E402
from tests import noise_fixtures as nf  # noqa: E402
from tests.audio_fixtures import espeak, espeak_available, silence, speak  # noqa: E402

RATE = 16_000
EXTRA = [
    "Please set a timer for ten minutes.",
    "Could you tell me what the weather will be like tomorrow in Berlin?",
    "Stop. Wait a moment please.",
    "The quick brown fox jumps over the lazy dog.",
    "I would like to book a table for two people tomorrow evening at seven, somewhere quiet near "
    "the river if possible.",
]


def utterances(voices: list[str], snrs: list[float | None]) -> list[tuple[str, str, float | None, bytes]]:
    """(text, voice, snr, pcm16 at 16 kHz) for every sentence, voice and noise level."""
    texts = list(dict.fromkeys([*QUESTIONS, *EXTRA, *(c.request for c in CASES)]))
    out = []
    for text in texts:
        for voice in voices:
            clean = speak(text, RATE) if voice == "piper" else espeak(text, "en-us", RATE)
            pcm = silence(200, RATE) + clean + silence(500, RATE)
            for snr in snrs:
                if snr is None:
                    out.append((text, voice, snr, pcm))
                    continue
                x = nf.to_float(pcm)
                out.append((text, voice, snr, nf.to_pcm16(nf.mix(x, nf.noise("babble", x.size, seed=len(text)), snr))))
    return out


async def transcribe(stt: WhisperSTT, pcm: bytes) -> tuple[str, float]:
    t0 = time.monotonic()
    text = ""
    async for event in stt.transcribe(pcm, language="en"):
        if isinstance(event, TranscriptDone):
            text = event.text
    return text, time.monotonic() - t0


def ladder_name(pads: tuple[float, ...]) -> str:
    return "fit " + "+".join(f"{p:g}" for p in pads)


async def run(voices: list[str], snrs: list[float | None], ladders: list[tuple[float, ...]]) -> dict[str, Any]:
    backends = {"full": WhisperSTT(window="full"),
                **{ladder_name(pads): WhisperSTT(window="fit", fit_pads=pads) for pads in ladders}}
    for stt in backends.values():
        await stt.warmup()
    rows: list[dict[str, Any]] = []
    for text, voice, snr, pcm in utterances(voices, snrs):
        row: dict[str, Any] = {"text": text, "voice": voice, "snr_db": snr, "audio_s": len(pcm) / 2 / RATE}
        for name, stt in backends.items():
            before, repadded = stt.stats["refitted"], stt.stats["repadded"]
            hypothesis, seconds = await transcribe(stt, pcm)
            row[name] = {"text": hypothesis, "seconds": seconds, "errors": nf.word_errors(text, hypothesis)[0],
                         "refitted": stt.stats["refitted"] > before, "repadded": stt.stats["repadded"] > repadded}
        row["words"] = nf.word_errors(text, "")[1]
        rows.append(row)
    for stt in backends.values():
        await stt.close()
    return {"rows": rows, "stats": {name: stt.stats for name, stt in backends.items()}}


def summary(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        noise = "clean" if row["snr_db"] is None else f"{row['snr_db']:g} dB babble"
        label = f"{row['voice']}, {noise}"
        groups.setdefault(label, []).append(row)
    groups["all"] = rows
    out = []
    for label, group in groups.items():
        words = sum(r["words"] for r in group)
        entry: dict[str, Any] = {"set": label, "utterances": len(group)}
        for name in names:
            entry[name] = {
                "wer": sum(r[name]["errors"] for r in group) / max(1, words),
                "median_s": statistics.median(r[name]["seconds"] for r in group),
                "mean_s": statistics.fmean(r[name]["seconds"] for r in group),
                "max_s": max(r[name]["seconds"] for r in group),
                "repadded": sum(r[name]["repadded"] for r in group),
                "refitted": sum(r[name]["refitted"] for r in group)}
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voices", nargs="+", default=["piper", "espeak"], choices=["piper", "espeak"])
    parser.add_argument("--clean-only", action="store_true", help="no babble rows")
    parser.add_argument("--pads", nargs="+", default=["3", ",".join(f"{p:g}" for p in FIT_PADS_S)],
                        help="padding ladders of the fitted rows, seconds: 3 / 6 / 3,8 (default: 3, and the default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stt_window.json")
    args = parser.parse_args()
    voices = [v for v in args.voices if v != "espeak" or espeak_available()]
    snrs: list[float | None] = [None] if args.clean_only else [None, 10.0]
    ladders = list(dict.fromkeys(tuple(float(p) for p in spec.split(",")) for spec in args.pads))
    result = asyncio.run(run(voices, snrs, ladders))
    names = ["full", *(ladder_name(pads) for pads in ladders)]
    table = summary(result["rows"], names)
    print(f"{'set':<24} {'n':>4} {'window':<10} {'WER':>6} {'median s':>9} {'mean s':>7} {'max s':>6} "
          f"{'repadded':>9} {'refitted':>9}")
    for e in table:
        for name in names:
            v = e[name]
            print(f"{e['set']:<24} {e['utterances']:>4} {name:<10} {v['wer']:>6.3f} {v['median_s']:>9.3f} "
                  f"{v['mean_s']:>7.3f} {v['max_s']:>6.3f} {v['repadded']:>9} {v['refitted']:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": table, **result}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
