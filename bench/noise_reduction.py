"""Noise reduction before and after: false turns on noise, WER on noisy speech, CPU per audio second.

For every setting (off; WebRTC and RNNoise at near/far field; near_field with the server's level
gate, and RNNoise near_field without it to show what the suppressor alone does) this measures,
with the server's own models (Silero VAD -> near-field gate -> server_vad turn logic at its
defaults, Whisper tiny.en through the WhisperSTT backend):

- false starts: 30 s of noise alone (white noise, and babble of 8 synthesized talkers) at the
  level it has in the noisy-speech mixes below: speech_started events, and the seconds spent inside
  a turn (babble that VAD hears as speech makes one turn that never ends);
- WER: questions spoken by Piper, mixed with that noise at 10 dB and 5 dB SNR (noise starts 1 s
  before the speech, as a microphone's would), suppressed as a stream, cut like a server_vad commit
  (300 ms before the speech to 500 ms after) and transcribed (the noise goes on 1.5 s after the
  speech); clean speech is the reference row;
- turns ok: the share of noisy utterances that became exactly one turn, ended while the noise went on
  (VAD alone takes babble for more speech, so the turn only ends where the noise does);
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
from openrealtime.engine.gate import NearFieldGate  # noqa: E402
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
# (suppressor, noise_reduction type, near-field level gate). The server applies the gate with every
# near_field session; the "rnnoise/near, no gate" row isolates what the suppressor alone does.
SETTINGS: list[tuple[str, str | None, bool]] = [
    ("off", None, False), ("webrtc", "near_field", True), ("webrtc", "far_field", False),
    ("rnnoise", "near_field", False), ("rnnoise", "near_field", True), ("rnnoise", "far_field", False)]
NOISES = ["white", "babble"]
SNRS = [10, 5]
CHUNK = RATE // 10  # 100 ms


def label(impl: str, kind: str | None, gate: bool) -> str:
    if kind is None:
        return "off"
    name = f"{impl}/{kind.split('_')[0]}"
    return name if gate or kind != "near_field" else f"{name}, no gate"


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


async def turns(vad: SileroVAD, pcm: bytes, gate: bool, threshold: float = 0.5) -> tuple[int, int, float]:
    """(speech_started, turns ended while ``pcm`` still played, seconds inside turns) under server_vad
    defaults, as the server runs it: VAD probabilities, through the near-field gate when ``gate``,
    into the turn logic. Quiet follows ``pcm`` so the state at its end is known."""
    stream = vad.new_stream()
    detector = VadTurnDetector(threshold, 500, vad.frame_ms)
    level_gate = NearFieldGate(vad.frame_ms) if gate else None
    audio = pcm + bytes(2 * RATE)  # quiet at the end closes a turn
    x = nf.to_float(audio).astype(np.float64)
    frame = int(vad.frame_ms * RATE / 1000)
    started = stopped = 0
    in_turn_frames = 0
    probs = await stream.process(audio)
    for i, prob in enumerate(probs):
        if level_gate is not None:
            seg = x[i * frame:(i + 1) * frame]
            prob = level_gate.feed(prob, float(np.mean(seg * seg)), detector.in_speech)
        in_turn_frames += detector.in_speech and i * frame < len(pcm) // 2
        for event in detector.feed(prob, i * vad.frame_ms):
            started += isinstance(event, SpeechStarted)
            stopped += isinstance(event, SpeechStopped) and event.end_ms <= len(pcm) / 2 / RATE * 1000
    return started, stopped, in_turn_frames * vad.frame_ms / 1000


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
    lead, tail = RATE, int(1.5 * RATE)
    results: dict[str, Any] = {"false_starts": {}, "false_turn_s": {}, "wer": {}, "turn_ok": {},
                               "si_sdr_gain_db": {}, "cpu_per_audio_s": {}}
    # Suppressed audio and transcripts depend on the suppressor only, not on the gate.
    cache: dict[tuple[str, str | None, str], tuple[bytes, float]] = {}
    hyps_cache: dict[tuple[str, str | None, str], list[str]] = {}

    def suppressed(impl: str, kind: str | None, key: str, pcm: bytes) -> tuple[bytes, float]:
        if (impl, kind, key) not in cache:
            cache[(impl, kind, key)] = suppress(impl, kind, pcm)
        return cache[(impl, kind, key)]

    for impl, kind, gate in SETTINGS:
        name = label(impl, kind, gate)
        print(f"[{name}]", flush=True)
        cpu = 0.0
        for noise_kind in NOISES:
            unit = nf.noise(noise_kind, noise_s * RATE, seed=7)
            for snr in SNRS:
                out, secs = suppressed(impl, kind, f"{noise_kind}{snr}", nf.to_pcm16(nf.scaled(unit, speech_rms, snr)))
                cpu += secs
                key = f"{name}|{noise_kind}|{snr}"
                started, _, in_turn = await turns(vad, out, gate)
                results["false_starts"][key] = started
                results["false_turn_s"][key] = in_turn
        results["cpu_per_audio_s"][name] = cpu / (noise_s * len(NOISES) * len(SNRS))
        for noise_kind in [None, *NOISES]:
            for snr in ([None] if noise_kind is None else SNRS):
                cond = f"{noise_kind or 'clean'}|{snr if snr is not None else '-'}"
                key = f"{name}|{cond}"
                hyps, ok, gains = [], 0, []
                for idx, s in enumerate(speech):
                    n = lead + s.size + tail
                    if noise_kind is None:
                        mixed = np.zeros(n, np.float32)
                        mixed[lead:lead + s.size] = s
                    else:
                        mixed = nf.mix(s, nf.noise(noise_kind, n, seed=100 + idx), snr, lead)
                    out, _ = suppressed(impl, kind, f"{cond}|{idx}", nf.to_pcm16(mixed))
                    if (impl, kind, f"{cond}|{idx}") not in hyps_cache:
                        a = (lead - int(0.3 * RATE)) * 2
                        b = (lead + s.size + RATE // 2) * 2
                        hyps_cache[(impl, kind, f"{cond}|{idx}")] = [await transcribe(stt, out[a:b])]
                    hyps += hyps_cache[(impl, kind, f"{cond}|{idx}")]
                    ok += (await turns(vad, out, gate))[:2] == (1, 1)
                    if noise_kind is not None:
                        clean = np.zeros(n, np.float32)
                        clean[lead:lead + s.size] = s
                        window = slice(lead - RATE // 4, n)
                        gains.append(si_sdr(clean[window], nf.to_float(out)[window])
                                     - si_sdr(clean[window], mixed[window]))
                results["wer"][key] = nf.wer(refs, hyps)
                results["turn_ok"][key] = ok / len(speech)
                if gains:
                    results["si_sdr_gain_db"][key] = float(np.mean(gains))
                results.setdefault("transcripts", {})[key] = hyps
    await stt.close() if hasattr(stt, "close") else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=len(SENTENCES))
    parser.add_argument("--noise-seconds", type=int, default=30)
    args = parser.parse_args()
    res = asyncio.run(run(args.sentences, args.noise_seconds))
    print(f"\nnoise reduction: {args.sentences} sentences, {args.noise_seconds} s of noise alone per condition, "
          f"server_vad defaults, Whisper tiny.en, {os.cpu_count()} CPU cores")
    print("false starts / false turn s: speech_started events and seconds inside turns on the noise alone; "
          "turns ok: noisy utterances that became exactly one turn; CPU: suppressor ms per audio second\n")
    header = ["setting", "noise", "false starts", "false turn s", "turns ok", "WER", "SI-SDR gain dB", "CPU ms/s"]
    rows = []
    for impl, kind, gate in SETTINGS:
        name = label(impl, kind, gate)
        for cond in ["clean|-"] + [f"{n}|{snr}" for n in NOISES for snr in SNRS]:
            key = f"{name}|{cond}"
            noisy = cond != "clean|-"
            rows.append([name, "clean" if not noisy else cond.replace("|", " ") + " dB",
                         str(res["false_starts"][key]) if noisy else "-",
                         f"{res['false_turn_s'][key]:.1f}" if noisy else "-",
                         f"{res['turn_ok'][key]:.2f}", f"{res['wer'][key]:.3f}",
                         f"{res['si_sdr_gain_db'][key]:+.1f}" if noisy and kind else "-",
                         f"{res['cpu_per_audio_s'][name] * 1000:.1f}" if not noisy and kind else ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"noise_reduction-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"sentences": args.sentences, "noise_seconds": args.noise_seconds,
                                "cpu_count": os.cpu_count(), **res}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
