"""Memory and time of long `/v1/audio/speech` requests without sentence punctuation.

Issue 10 finding 7: one request of 4,096 characters with no punctuation raised the server's RSS by
GBs and the memory was never given back, because the synthesizer's tensors grow with the length of
what it synthesizes in one go. This starts the real server (offline stack, default settings),
posts text of each length in turn and reads the server's VmRSS from /proc: before the request,
its peak during the request (VmHWM, reset through /proc/<pid>/clear_refs), and after it.

Prints one table and writes JSON to bench/results/tts_memory.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import Server, start_server, stop_server  # noqa: E402
from tests.e2e.test_tts_long_text import SPEECH_RATE, reset_peak, status_mb, unpunctuated  # noqa: E402


def speak(server: Server, text: str) -> dict[str, Any]:
    """One streamed pcm request; sampled RSS as a fallback for the peak when VmHWM cannot be reset."""
    pid = server.proc.pid
    time.sleep(1.0)  # let the previous request's memory settle
    before = status_mb(pid, "VmRSS")
    hwm_reset = reset_peak(pid)
    sampled = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            sampled.append(status_mb(pid, "VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    first: float | None = None
    size = 0
    try:
        with httpx.stream("POST", f"{server.base_url}/v1/audio/speech", timeout=600,
                          headers={"Authorization": f"Bearer {server.api_key}"},
                          json={"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"}) as r:
            r.raise_for_status()
            for chunk in r.iter_bytes():
                if chunk and first is None:
                    first = time.monotonic() - t0
                size += len(chunk)
    finally:
        elapsed = time.monotonic() - t0
        done.set()
        sampler.join()
    peak = max(status_mb(pid, "VmHWM") if hwm_reset else 0.0, *sampled)
    time.sleep(1.0)
    return {"chars": len(text), "seconds": round(elapsed, 2), "first_audio_s": round(first or 0.0, 2),
            "audio_s": round(size / 2 / SPEECH_RATE, 1), "rss_before_mb": round(before),
            "rss_peak_mb": round(peak), "rss_after_mb": round(status_mb(pid, "VmRSS"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, nargs="+", default=[1000, 4096])
    parser.add_argument("--label", default="latest",
                        help="results are stored under this name; runs under other names are kept")
    args = parser.parse_args()
    server = start_server(name="bench-tts-memory")
    try:
        rows = [speak(server, unpunctuated(n)) for n in args.chars]
    finally:
        stop_server(server)
    print(f"{'chars':>6} {'seconds':>8} {'first s':>8} {'audio s':>8} {'RSS before':>11} {'peak':>7} {'after':>7}"
          f" {'growth':>7}   (MB)")
    for row in rows:
        print(f"{row['chars']:>6} {row['seconds']:>8.1f} {row['first_audio_s']:>8.2f} {row['audio_s']:>8.1f}"
              f" {row['rss_before_mb']:>11} {row['rss_peak_mb']:>7} {row['rss_after_mb']:>7}"
              f" {row['rss_after_mb'] - row['rss_before_mb']:>+7}")
    path = ROOT / "bench" / "results" / "tts_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        runs = dict(json.loads(path.read_text()).get("runs", {}))  # keep other labels (before/after)
    runs[args.label] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
