"""Noise reduction before and after: false turns on noise, WER on noisy speech, CPU per audio second.

For every suppressor setting (off, WebRTC near/far field, RNNoise near/far field) this measures,
with the server's own models (Silero VAD + the server_vad turn logic at its defaults, Whisper
tiny.en through the WhisperSTT backend):

- false speech_started: 30 s of noise alone (white noise, and babble of 8 synthesized talkers) at
  the level it has in the noisy-speech mixes below, fed through suppressor -> VAD -> turn logic,
  at the default VAD threshold 0.5 and at a sensitive 0.3 (plus the share of frames VAD calls speech);
- WER: questions spoken by Piper, mixed with that noise at 10 dB and 5 dB SNR (noise starts 1 s
  before the speech, as a microphone's would), suppressed as a stream, cut like a server_vad commit
  (300 ms before the speech to 500 ms after) and transcribed; clean speech is the reference row;
- turns: fraction of noisy utterances that server_vad turned into exactly one started+stopped turn;
- SI-SDR gain: scale-invariant signal-to-distortion ratio of the output against the clean speech,
  minus that of the unprocessed mix (dB; the usual "how much cleaner" measure, after aligning delays);
- CPU: process time per second of audio, in 100 ms chunks as a session would feed it.

Prints one table and writes JSON to bench/results/. Noise is generated at run time (seeded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrealtime.backends.noise import RNNoiseSuppressor, WebRtcNoiseSuppressor  # noqa: E402
from openrealtime.backends.silero_vad import SileroVAD  # noqa: E402
from openrealtime.backends.whisper_stt import WhisperSTT  # noqa: E402
from openrealtime.engine.turns import SpeechStarted, SpeechStopped, VadTurnDetector  # noqa: E402
from tests import noise_fixtures as nf  # noqa: E402
from tests.audio_fixtures import speak  # noqa: E402

RATE = 16_000
SENTENCES = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "Can you name a large animal?",
    "What color is the sky on a clear day?",
    "Tell me something about the moon.",
    "What do bees make?",
    "Please set a timer for ten minutes.",
    "How far away is the nearest airport?",
    "Could you recommend a good book to read?",
    "What time does the library open on Sunday?",
    "I would like to order a pizza with mushrooms.",
    "Remind me to call my mother this evening.",
    "Which planet is closest to the sun?",
    "Turn off the lights in the kitchen please.",
    "How long does it take to boil an egg?",
    "What is the best way to learn a new language?",
    "Send a message to Sarah saying I will be late.",
    "Is it going to rain this weekend?",
    "Play some relaxing music in the living room.",
    "How many people live in New York City?",
]
SETTINGS: list[tuple[str, str | None]] = [("off", None), ("webrtc", "near_field"), ("webrtc", "far_field"),
                                          ("rnnoise", "near_field"), ("rnnoise", "far_field")]
NOISES = ["white", "babble"]
SNRS = [10, 5]
CHUNK = RATE // 10  # 100 ms


def label(impl: str, kind: str | None) -> str:
    return "off" if kind is None else f"{impl}/{kind.split('_')[0]}"


def make_stream(impl: str, kind: str | None) -> Any:
    if kind is None:
        return None
    return (WebRtcNoiseSuppressor() if impl == "webrtc" else RNNoiseSuppressor()).new_stream(kind)  # type: ignore[arg-type]


def suppress(impl: str, kind: str | None, pcm: bytes) -> tuple[bytes, float]:
    """The stream's output for ``pcm`` fed in 100 ms chunks, and the process CPU seconds it took."""
    stream = make_stream(impl, kind)
    if stream is None:
        return pcm, 0.0
    t0 = time.process_time()
    out = [stream.process_sync(pcm[i:i + CHUNK * 2]) for i in range(0, len(pcm), CHUNK * 2)]
    out.append(stream.flush())
    return b"".join(out), time.process_time() - t0


async def turns(vad: SileroVAD, pcm: bytes, threshold: float = 0.5) -> tuple[int, int, float]:
    """(speech_started, speech_stopped, share of speech frames) under server_vad defaults."""
    stream = vad.new_stream()
    detector = VadTurnDetector(threshold, 500, vad.frame_ms)
    started = stopped = 0
    probs = await stream.process(pcm + bytes(RATE))  # 0.5 s of quiet closes a turn
    for i, prob in enumerate(probs):
        for event in detector.feed(prob, i * vad.frame_ms):
            started += isinstance(event, SpeechStarted)
            stopped += isinstance(event, SpeechStopped)
    return started, stopped, float(np.mean(np.asarray(probs) >= threshold)) if probs else 0.0


def si_sdr(clean: np.ndarray, out: np.ndarray, max_delay: int = 1600) -> float:
    """SI-SDR (dB) of ``out`` against ``clean``, at the delay (0..max_delay samples) that fits best."""
    n = min(clean.size, out.size) - max_delay
    ref = clean[:n].astype(np.float64)
    delays = range(0, max_delay, 4)
    best = max(delays, key=lambda d: float(np.dot(ref, out[d:d + n])))
    est = out[best:best + n].astype(np.float64)
    target = ref * (np.dot(est, ref) / max(np.dot(ref, ref), 1e-9))
    return float(10 * np.log10(np.sum(target ** 2) / max(np.sum((est - target) ** 2), 1e-9)))


async def transcribe(stt: WhisperSTT, pcm: bytes) -> str:
    text = ""
    async for event in stt.transcribe(pcm, language="en"):
        text = getattr(event, "text", text)
    return text


async def run(n_sentences: int, noise_s: int) -> dict[str, Any]:
    vad, stt = SileroVAD(), WhisperSTT()
    await asyncio.gather(vad.warmup(), stt.warmup())
    refs = SENTENCES[:n_sentences]
    speech = [nf.to_float(speak(s, RATE)) for s in refs]
    speech_rms = float(np.median([nf.active_rms(s) for s in speech]))
    lead, tail = RATE, int(0.7 * RATE)
    results: dict[str, Any] = {"false_starts": {}, "false_starts_sensitive": {}, "noise_speech_share": {},
                               "wer": {}, "turn_ok": {}, "si_sdr_gain_db": {}, "cpu_per_audio_s": {}}
    cpu: dict[str, list[float]] = {}
    audio_s: dict[str, float] = {}

    for impl, kind in SETTINGS:
        name = label(impl, kind)
        print(f"[{name}]", flush=True)
        for noise_kind in NOISES:
            unit = nf.noise(noise_kind, noise_s * RATE, seed=7)
            for snr in SNRS:
                pcm = nf.to_pcm16(nf.scaled(unit, speech_rms, snr))
                out, secs = suppress(impl, kind, pcm)
                cpu.setdefault(name, []).append(secs)
                audio_s[name] = audio_s.get(name, 0.0) + noise_s
                key = f"{name}|{noise_kind}|{snr}"
                started, _, share = await turns(vad, out)
                results["false_starts"][key] = started
                results["noise_speech_share"][key] = share
                results["false_starts_sensitive"][key] = (await turns(vad, out, 0.3))[0]
        for noise_kind in [None, *NOISES]:
            for snr in ([None] if noise_kind is None else SNRS):
                hyps, ok, gains = [], 0, []
                for idx, s in enumerate(speech):
                    n = lead + s.size + tail
                    if noise_kind is None:
                        mixed = np.zeros(n, np.float32)
                        mixed[lead:lead + s.size] = s
                    else:
                        mixed = nf.mix(s, nf.noise(noise_kind, n, seed=100 + idx), snr, lead)
                    out, _ = suppress(impl, kind, nf.to_pcm16(mixed))
                    a = (lead - int(0.3 * RATE)) * 2
                    b = (lead + s.size + RATE // 2) * 2
                    hyps.append(await transcribe(stt, out[a:b]))
                    ok += (await turns(vad, out))[:2] == (1, 1)
                    if noise_kind is not None:
                        clean = np.zeros(n, np.float32)
                        clean[lead:lead + s.size] = s
                        window = slice(lead - RATE // 4, n)
                        gains.append(si_sdr(clean[window], nf.to_float(out)[window])
                                     - si_sdr(clean[window], mixed[window]))
                key = f"{name}|{noise_kind or 'clean'}|{snr if snr is not None else '-'}"
                results["wer"][key] = nf.wer(refs, hyps)
                results["turn_ok"][key] = ok / len(speech)
                if gains:
                    results["si_sdr_gain_db"][key] = float(np.mean(gains))
                results.setdefault("transcripts", {})[key] = hyps
        if cpu.get(name):
            results["cpu_per_audio_s"][name] = sum(cpu[name]) / audio_s[name]
    await stt.close() if hasattr(stt, "close") else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=len(SENTENCES))
    parser.add_argument("--noise-seconds", type=int, default=30)
    args = parser.parse_args()
    res = asyncio.run(run(args.sentences, args.noise_seconds))
    names = [label(i, k) for i, k in SETTINGS]
    conds = [(n, s) for n in NOISES for s in SNRS]
    print(f"\nnoise reduction, {args.sentences} sentences, {args.noise_seconds} s of noise per condition, "
          f"{os.cpu_count()} CPU cores (server_vad defaults, Whisper tiny.en)")
    print("\nWER (Whisper tiny.en) on speech with noise at the SNR; CPU = suppressor time per audio second")
    print(" | ".join(["setting", "cpu ms/s", "WER clean"] + [f"WER {n} {s}dB" for n, s in conds]))
    for name in names:
        row = [name, f"{res['cpu_per_audio_s'].get(name, 0.0) * 1000:.1f}", f"{res['wer'][f'{name}|clean|-']:.3f}"]
        row += [f"{res['wer'][f'{name}|{n}|{s}']:.3f}" for n, s in conds]
        print(" | ".join(row))
    print("\nnoise alone: false speech_started at VAD threshold 0.5 (0.3) [share of frames VAD calls speech];"
          " SI-SDR gain on the noisy speech, dB")
    print(" | ".join(["setting"] + [f"noise {n} {s}dB" for n, s in conds] + [f"SI-SDR {n} {s}dB" for n, s in conds]))
    for name in names:
        row = [name] + [f"{res['false_starts'][k]} ({res['false_starts_sensitive'][k]}) "
                        f"[{res['noise_speech_share'][k]:.2f}]" for k in (f"{name}|{n}|{s}" for n, s in conds)]
        row += [f"{res['si_sdr_gain_db'].get(f'{name}|{n}|{s}', 0.0):+.1f}" for n, s in conds]
        print(" | ".join(row))
    print("\nturns ok (exactly one speech_started + speech_stopped per noisy utterance):")
    for name in names:
        print(f"  {name:14}" + "  ".join(f"{n} {s}dB: {res['turn_ok'][f'{name}|{n}|{s}']:.2f}" for n, s in conds))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"noise_reduction-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"sentences": args.sentences, "noise_seconds": args.noise_seconds,
                                "cpu_count": os.cpu_count(), **res}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
