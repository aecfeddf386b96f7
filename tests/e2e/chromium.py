"""Headless Chromium for browser tests: Debian's `chromium` driven by Playwright through
`executable_path` (never `playwright install`), with a fake microphone that plays a WAV.

Without Chromium or Playwright the tests skip locally and fail in CI, where they must run.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..audio_fixtures import silence, speak, write_wav

CHROMIUM = Path(os.environ.get("OPENREALTIME_CHROMIUM", "/usr/bin/chromium"))
MIC_RATE = 48_000
# Headless on a machine without a display, GPU, sandbox or outside network; Playwright adds
# --headless and a fresh temporary --user-data-dir itself.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    # Offer 127.0.0.1 too, so that a machine with only a loopback interface still connects.
    "--allow-loopback-in-peer-connection",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_chromium() -> Path:
    """Chromium's path; skip without Chromium or Playwright, except in CI, where the test must run."""
    problem = None
    if not CHROMIUM.is_file():
        problem = f"{CHROMIUM} is missing (run scripts/install-system-deps.sh as root)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem is None:
        return CHROMIUM
    if in_ci():
        pytest.fail(f"browser test cannot run in CI: {problem}", pytrace=False)
    pytest.skip(problem)


def fake_mic_args(wav: Path | None = None) -> list[str]:
    """Launch flags; with `wav`, the fake microphone plays it once from getUserMedia on."""
    return [*CHROMIUM_ARGS, *([f"--use-file-for-fake-audio-capture={wav}%noloop"] if wav else [])]


def spoken_wav(path: Path, text: str, lead_ms: int, tail_ms: int = 3000) -> Path:
    """`text` spoken with silence around it: PCM16 mono 48 kHz, what Chromium's fake mic reads."""
    pcm = silence(lead_ms, MIC_RATE) + speak(text, MIC_RATE) + silence(tail_ms, MIC_RATE)
    return write_wav(path, pcm, MIC_RATE)


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    """Quiet, and serves ES modules (`.mjs`) with a JavaScript type, as browsers require."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript"}

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_origin(directory: Path) -> Iterator[str]:
    """`directory` served on its own origin (127.0.0.1, another port than the server's): the page is
    cross-origin to the API, as a real web app is."""
    handler = functools.partial(_StaticHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
