"""Voice-to-voice latency: end of user speech in the sent audio -> first audible reply at the client.

Runs the real server (offline stack, default the 0.5B model), speaks several questions into it in
real time over WebRTC (aiortc peer, Opus both ways) and WebSocket (openai SDK, PCM deltas), and
measures at the client (a WebSocket reply counts as played from its first delta on, so silence at
the start of its audio is waited through as over WebRTC). The per-stage waterfall comes from the
server's `turn-timing` log lines, whose monotonic timestamps share this machine's clock with the
client.

Prints one table and writes JSON to bench/results/.
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
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openai import AsyncOpenAI  # noqa: E402

from tests.audio_fixtures import silence, speak  # noqa: E402
from tests.e2e.conftest import Server, start_server, stop_server  # noqa: E402
from tests.e2e.webrtc_client import MicTrack, Peer, open_call  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "Can you name a large animal?",
    "What colour is the sky on a clear day?",
    "Tell me something about the moon.",
    "What do bees make?",
]
AUDIBLE_RMS = 300.0  # PCM16 RMS above this counts as reply speech, not silence or codec noise
FRAME_BYTES_24K = 480 * 2  # 20 ms of 24 kHz PCM16: WebSocket audio is judged per frame, as WebRTC's
STAGES = ["speech_stopped", "stt_done", "prompt_ready", "llm_first_token", "first_clause",
          "tts_first_chunk", "audio_out"]


# semantic_vad rows (--turn-detection semantic_vad): its eagerness, and its longest silence wait.
EAGERNESS = "auto"
SEMANTIC_MAX_WAIT_MS = {"low": 8000, "medium": 4000, "auto": 4000, "high": 2000}


def session_config(silence_ms: int, turn: str = "server_vad") -> dict[str, Any]:
    td: dict[str, Any] = {"type": "server_vad", "silence_duration_ms": silence_ms}
    if turn == "semantic_vad":
        td = {"type": "semantic_vad", "eagerness": EAGERNESS}
    return {
        "type": "realtime", "output_modalities": ["audio"],
        "instructions": "You are a helpful voice assistant. Answer in one short sentence.",
        "audio": {"input": {"transcription": {"model": "whisper-1"}, "turn_detection": td}},
    }


def trailing_ms(silence_ms: int, turn: str) -> int:
    """Silence sent after each question: enough for the turn to end whatever the detector decides."""
    return (SEMANTIC_MAX_WAIT_MS[EAGERNESS] if turn == "semantic_vad" else silence_ms) + 1500


def rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    return float(np.sqrt((x ** 2).mean())) if len(x) else 0.0


class TimedMic(MicTrack):
    """A MicTrack that notes when the last sample of the current utterance left the client."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0  # samples handed to aiortc
        self.speech_end_sample = 0
        self.speech_end_at = 0.0

    async def recv(self):
        frame = await super().recv()
        self.sent += frame.samples
        if not self.speech_end_at and self.speech_end_sample and self.sent >= self.speech_end_sample:
            self.speech_end_at = time.monotonic()
        return frame

    def utter(self, speech48: bytes, trailing_ms: int) -> None:
        self.speech_end_at = 0.0
        self.speech_end_sample = self.sent + (self.remaining_ms * 48) + len(speech48) // 2
        self.say(speech48 + silence(trailing_ms, 48_000))


def server_marks(server: Server, response_id: str) -> dict[str, float]:
    """Absolute monotonic time of each stage of a response, from the server log."""
    for line in server.log_text().splitlines():
        if "turn-timing" in line and response_id in line:
            data = json.loads(line.split("turn-timing ", 1)[1])
            base = data["base_monotonic"]
            return {k: base + v / 1000 for k, v in data["ms"].items() if k in STAGES}
    return {}


async def webrtc_turns(server: Server, questions: list[bytes], silence_ms: int,
                       turn: str = "server_vad", session: dict[str, Any] | None = None,
                       validate: bool = True) -> list[dict]:
    """One row per question. `session`: fields merged over `session_config` (e.g. instructions);
    `validate=False` skips the per-event schema checks (their Node round trip blocks the loop).
    Rows also hold `reply_text` (the reply's transcript from `response.done`) and `user_transcript`
    (the server's transcription of the question, when it arrived before the reply ended)."""
    mic = TimedMic()
    peer, _, _ = await open_call(server, peer=Peer(mic=mic, record=True, validate=validate))
    rows = []
    try:
        peer.send({"type": "session.update", "session": {**session_config(silence_ms, turn), **(session or {})}})
        await peer.collect("session.updated")
        for pcm24 in questions:
            heard_from = len(peer.heard)
            mic.utter(speak_48(pcm24), trailing_ms=trailing_ms(silence_ms, turn))
            events = await peer.collect("response.done", wait_s=120)
            response = events[-1]["response"]
            events += await peer.collect("output_audio_buffer.stopped", wait_s=120)
            first = next((h for h in peer.heard[heard_from:] if h.at > mic.speech_end_at and h.rms > AUDIBLE_RMS),
                         None)
            row = turn_row(server, response["id"], mic.speech_end_at, first.at if first else None)
            row["reply_text"] = reply_transcript(response)
            row.update(prompt_usage(response))
            said = [e.get("transcript", "") for e in events
                    if e["type"] == "conversation.item.input_audio_transcription.completed"]
            row["user_transcript"] = said[-1] if said else None
            rows.append(row)
            await asyncio.sleep(0.5)
    finally:
        await peer.close()
    return rows


def prompt_usage(response: dict[str, Any]) -> dict[str, int | None]:
    """The reply's prompt tokens and how many of them the LLM had cached (the rest it evaluated)."""
    usage = response.get("usage") or {}
    details = usage.get("input_token_details") or {}
    return {"input_tokens": usage.get("input_tokens"), "cached_tokens": details.get("cached_tokens")}


def reply_transcript(response: dict[str, Any]) -> str:
    """The text of a `response.done` response: its message items' transcripts (or text)."""
    return "".join(part.get("transcript") or part.get("text") or ""
                   for item in response.get("output", []) if item.get("type") == "message"
                   for part in item.get("content", []))


def speak_48(pcm24: bytes) -> bytes:
    from openrealtime.audio.resample import resample
    return resample(pcm24, 24_000, 48_000)


async def websocket_turns(server: Server, questions: list[bytes], silence_ms: int,
                          turn: str = "server_vad") -> list[dict]:
    client = AsyncOpenAI(api_key=server.api_key, base_url=f"{server.base_url}/v1",
                         websocket_base_url=f"{server.ws_url}/v1")
    rows = []
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session=session_config(silence_ms, turn))  # type: ignore[arg-type]
        state: dict[str, Any] = {"first_audible": None, "done": None, "audio_ms": 0, "pcm": bytearray(),
                                 "transcript": ""}
        new_event = asyncio.Event()

        async def reader() -> None:
            async for event in conn:
                if event.type == "response.output_audio.delta":
                    # Played as it arrives, from the first delta on: a sample is heard no sooner
                    # than its arrival, nor than its place in the stream after playback began
                    # (so silence at the start of the audio counts, as it does over WebRTC).
                    now = time.monotonic()
                    chunk = base64.b64decode(event.delta)
                    if not state["pcm"]:
                        state["playing_from"] = now
                    if state["first_audible"] is None:
                        for i in range(0, len(chunk), FRAME_BYTES_24K):
                            if rms(chunk[i:i + FRAME_BYTES_24K]) > AUDIBLE_RMS:
                                offset_s = (len(state["pcm"]) + i) / 48_000
                                state["first_audible"] = max(now, state["playing_from"] + offset_s)
                                break
                    state["audio_ms"] += len(chunk) // 48
                    state["pcm"] += chunk
                elif event.type == "response.output_audio_transcript.done":
                    state["transcript"] += event.transcript
                elif event.type == "response.done":
                    state["done"] = event.response.id
                new_event.set()

        read_task = asyncio.create_task(reader())
        try:
            for pcm24 in questions:
                state.update(first_audible=None, done=None, audio_ms=0, pcm=bytearray(), transcript="")
                await send_realtime(conn, silence(300, 24_000))
                await send_realtime(conn, pcm24)
                speech_end_at = time.monotonic()
                trailing = asyncio.create_task(send_realtime(conn, silence(trailing_ms(silence_ms, turn), 24_000)))
                async with asyncio.timeout(120):
                    while state["done"] is None:
                        new_event.clear()
                        await new_event.wait()
                await trailing
                row = turn_row(server, state["done"], speech_end_at, state["first_audible"])
                row["reply_pcm24"], row["reply_text"] = bytes(state["pcm"]), state["transcript"]
                rows.append(row)
                # Let the client "play" the reply before the next question (no barge-in).
                await asyncio.sleep(state["audio_ms"] / 1000)
        finally:
            read_task.cancel()
    return rows


async def send_realtime(conn: Any, pcm24: bytes) -> None:
    """20 ms chunks, paced against the clock like a microphone."""
    step = 480 * 2
    start = time.monotonic()
    for n, i in enumerate(range(0, len(pcm24), step)):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm24[i:i + step]).decode())
        await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - time.monotonic()))


def turn_row(server: Server, response_id: str, speech_end_at: float, first_audible_at: float | None) -> dict:
    marks = server_marks(server, response_id)
    row: dict[str, Any] = {"response": response_id,
                           "voice_to_voice_ms": None if first_audible_at is None
                           else (first_audible_at - speech_end_at) * 1000}
    for stage in STAGES:
        row[stage] = (marks[stage] - speech_end_at) * 1000 if stage in marks else None
    row["client_heard"] = row["voice_to_voice_ms"]
    return row


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """Word-level edit distance over the reference's length (case and punctuation ignored)."""
    ref, hyp = (re.findall(r"[a-z0-9']+", t.lower()) for t in (reference, hypothesis))
    if not ref:
        return None
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


async def score_speech(results: dict[str, list[dict]]) -> None:
    """How the replies sound, in a number: Whisper's transcript of the audio the client received
    (WebSocket rows) against the text the server spoke. Choppy or garbled speech raises the WER.
    Run after the servers have stopped, so it costs the latency figures nothing."""
    from openrealtime.audio.resample import resample
    from openrealtime.backends.speech import TranscriptDone
    from openrealtime.backends.whisper_stt import WhisperSTT

    stt = WhisperSTT()
    for rows in results.values():
        for row in rows:
            pcm, text = row.pop("reply_pcm24", b""), row.get("reply_text", "")
            if not pcm or not text:
                continue
            heard = ""
            async for event in stt.transcribe(resample(pcm, 24_000, 16_000), language="en"):
                if isinstance(event, TranscriptDone):
                    heard = event.text
            row["heard_text"], row["wer"] = heard, word_error_rate(text, heard)


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`--compare` entries: `label:NAME=value,NAME=value` (settings without the OPENREALTIME_ prefix)."""
    label, _, assignments = spec.partition(":")
    env = {}
    for part in filter(None, assignments.split(",")):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise SystemExit(f"--compare {spec!r}: expected label:SETTING=value[,SETTING=value]")
        env["OPENREALTIME_" + name.strip().upper()] = value.strip()
    return label or "default", env


async def run(model: str, silence_ms: int, n: int, transports: list[str],
              turns: tuple[str, ...] = ("server_vad",), variants: list[tuple[str, dict[str, str]]] | None = None
              ) -> dict:
    """One server per variant (the settings under comparison), the same spoken questions for each."""
    questions = [speak(q, 24_000) for q in (QUESTIONS * 3)[:n]]
    results: dict[str, list[dict]] = {}
    for label, extra in variants or [("", {})]:
        env = {"OPENREALTIME_LLM_MODEL": model, **extra}
        if os.environ.get("OPENREALTIME_LLM_THREADS"):
            env.setdefault("OPENREALTIME_LLM_THREADS", os.environ["OPENREALTIME_LLM_THREADS"])
        prefix = f"{label} " if label else ""
        await run_server(env, prefix, questions, silence_ms, transports, turns, results)
    return results


async def run_server(env: dict[str, str], prefix: str, questions: list[bytes], silence_ms: int,
                     transports: list[str], turns: tuple[str, ...], results: dict[str, list[dict]]) -> None:
    server = start_server(env, name="bench-voice")
    try:
        for turn in turns:  # rows are "<transport>" for server_vad, "<transport> semantic_vad" otherwise
            suffix = "" if turn == "server_vad" else f" {turn}"
            if "webrtc" in transports:
                results[prefix + "webrtc" + suffix] = await webrtc_turns(server, questions, silence_ms, turn)
            if "websocket" in transports:
                results[prefix + "websocket" + suffix] = await websocket_turns(server, questions, silence_ms, turn)
    finally:
        stop_server(server)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--silence-ms", type=int, default=500)
    parser.add_argument("--utterances", type=int, default=6)
    parser.add_argument("--transports", nargs="+", default=["webrtc", "websocket"])
    parser.add_argument("--turn-detection", nargs="+", default=["server_vad"], choices=["server_vad", "semantic_vad"],
                        help="one row per transport and turn detection type (semantic_vad: smart-turn)")
    parser.add_argument("--eagerness", default="auto", choices=sorted(SEMANTIC_MAX_WAIT_MS))
    parser.add_argument("--compare", nargs="+", metavar="LABEL:SETTING=VALUE,...",
                        help="before/after rows in one run: one server per entry with those settings, e.g. "
                             "before:tts_first_words=0 after:tts_first_words=4")
    args = parser.parse_args()
    global EAGERNESS
    EAGERNESS = args.eagerness
    variants = [parse_variant(spec) for spec in args.compare] if args.compare else None
    results = asyncio.run(run(args.model, args.silence_ms, args.utterances, args.transports,
                              tuple(args.turn_detection), variants))
    asyncio.run(score_speech(results))
    cols = [*STAGES, "client_heard", "wer"]
    print(f"\nvoice-to-voice latency (wer: mean word error rate of Whisper's transcript of the received "
          f"reply audio against the spoken text, WebSocket rows), {args.model}, "
          f"server_vad silence_duration_ms={args.silence_ms}, "
          f"semantic_vad eagerness={args.eagerness}, "
          f"{os.cpu_count()} CPU cores; medians in ms from the end of user speech")
    width = max([22, *(len(k) + 1 for k in results)])
    print(f"{'transport':{width}} {'n':>3} " + " ".join(f"{c:>15}" for c in cols))
    summary = {}
    for transport, rows in results.items():
        med = {c: median([r.get(c) for r in rows]) for c in cols}
        wers = [r["wer"] for r in rows if r.get("wer") is not None]
        med["wer"] = statistics.mean(wers) if wers else None  # the mean: one garbled reply must show
        summary[transport] = med
        print(f"{transport:{width}} {len(rows):>3} " + " ".join(
            f"{(fmt(med[c]) if c != 'wer' else '-' if med[c] is None else f'{med[c]:.2f}'):>15}" for c in cols))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"voice_latency-{re.sub(r'[^a-z0-9.]+', '-', args.model)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": args.model, "silence_ms": args.silence_ms, "cpu_count": os.cpu_count(),
                                "turn_detection": args.turn_detection, "eagerness": args.eagerness,
                                "compare": args.compare,
                                "summary_median_ms": summary, "turns": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
