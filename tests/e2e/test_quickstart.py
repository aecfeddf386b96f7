"""README's quick start, tried as a new user would: a clean clone, `make serve`, the SDK, a browser.

The clone gets its own venv from `make serve` (nothing is borrowed from the test's venv, so a
dependency missing from pyproject.toml or the Makefile fails here); pip's cache makes that about a
minute. The model is the tiny smollm2-135m (`make serve MODEL=...`, as the README says), in a
temporary model cache. The Python snippet run is the one in README.md's quick start, with the port
changed; the log lines the README quotes must appear in the server's log.

While the work tree has uncommitted changes, they are copied over the clone (what it would hold
once committed); OPENREALTIME_TEST_README names another README to try (proposed text).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ARTIFACTS, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# `make serve` variables and venv markers of the caller that must not leak into the user's shell.
_MAKE_VARS = {"PYTHON", "VENV", "BIN", "MODEL", "HOST", "PORT", "TEST_MODELS", "MAKEFLAGS", "MFLAGS",
              "MAKELEVEL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
# What the README promises the log shows, and the server really logs.
LOG_LINES = ("OpenAI Realtime API at base_url=", "Ready: all models loaded")
# The snippet sets no max_output_tokens, and smollm2-135m (sampled at the default temperature) now and
# then loops on one sentence up to the reply's token cap: 1 "Hi!" in 200 (ad-hoc script against
# `openrealtime serve --model smollm2-135m`) ran to 4,063 tokens, 121 s on an idle 2-core Xeon (the
# other 199: 2-155 tokens, under 4 s). That is the tiny test model, not the
# quick start; the bound leaves room for such a reply on a loaded machine.
REPLY_TIMEOUT_S = 600


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def clean_clone(dest: Path) -> None:
    """`git clone` of this repository, plus the work tree's uncommitted changes (not node_modules)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    changed = _git("ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, changed):
        src = ROOT / rel
        if "node_modules" in Path(rel).parts or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for rel in filter(None, _git("ls-files", "-z", "--deleted").split("\0")):
        (dest / rel).unlink(missing_ok=True)
    readme = os.environ.get("OPENREALTIME_TEST_README")
    if readme:
        shutil.copy2(readme, dest / "README.md")


def quick_start(readme: str) -> str:
    """The README's "Quick start" section."""
    match = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, "README.md has no '## Quick start' section"
    return match.group(1)


def user_env(cache: Path) -> dict[str, str]:
    """A user's shell: no test venv on PATH, no openrealtime settings, a fresh model cache."""
    venv_bin = str(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items()
           if k not in _MAKE_VARS and not k.upper().startswith("OPENREALTIME_")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(venv_bin))
    env["OPENREALTIME_MODEL_CACHE_DIR"] = str(cache)
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory removed afterwards (the clone's venv is over 1 GB)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.timeout(1800)
def test_readme_quick_start_from_a_clean_clone(workdir: Path):
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    clone = workdir / "openrealtime"
    clean_clone(clone)
    section = quick_start((clone / "README.md").read_text())
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert snippets, "the quick start has no Python snippet"
    assert "make serve" in section and "http://127.0.0.1:8000/" in section
    for line in LOG_LINES:
        assert line in section, f"the quick start should show the log line {line!r}"
    timings["clone_s"] = time.monotonic() - t0

    port = free_port()
    env = user_env(workdir / "model-cache")
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / f"quickstart-{port}.log"
    t_serve = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "serve", "MODEL=smollm2-135m", "HOST=127.0.0.1", f"PORT={port}"],
                                cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while "Ready: all models loaded" not in (so_far := log_path.read_text(errors="replace")):
            assert proc.poll() is None, f"make serve exited with {proc.returncode}:\n{so_far[-6000:]}"
            assert time.monotonic() < deadline, f"not ready in 900 s:\n{so_far[-6000:]}"
            if "Uvicorn running on" in so_far:
                timings.setdefault("make_serve_to_listening_s", time.monotonic() - t_serve)
            time.sleep(0.5)
        timings["make_serve_to_ready_s"] = time.monotonic() - t_serve
        text = log_path.read_text(errors="replace")
        for line in LOG_LINES:
            assert line in text, line
        assert (clone / ".venv" / "bin" / "python").is_file()
        python = str(clone / ".venv" / "bin" / "python")

        # 2. The README's SDK snippet, verbatim but for the port, with the clone's own Python.
        script = workdir / "hello.py"
        script.write_text(snippets[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        t_answer = time.monotonic()
        hello = subprocess.run([python, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                               timeout=REPLY_TIMEOUT_S)
        timings["first_text_answer_s"] = time.monotonic() - t_answer
        assert hello.returncode == 0, hello.stderr
        assert hello.stdout.strip(), "the snippet printed no answer"

        # 3. The browser: the playground page, and the ephemeral key its Connect button fetches.
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "Connect" in page.text
        minted = httpx.post(f"{base}/playground/session", json={}, timeout=10)
        assert minted.status_code == 200, minted.text
        assert minted.json()["value"].startswith("ek_")

        # What is heard: a spoken answer (Piper, installed by `make serve`) through the same SDK.
        t_audio = time.monotonic()
        spoken = subprocess.run([python, "-c", _AUDIO_TURN, base.replace("http://", "")], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=REPLY_TIMEOUT_S)
        timings["spoken_answer_s"] = time.monotonic() - t_audio
        assert spoken.returncode == 0, spoken.stderr
        result = json.loads(spoken.stdout)
        assert result["audio_bytes"] > 24_000 * 2 * 0.3, result  # at least 0.3 s of 24 kHz PCM16
        assert result["transcript"].strip(), result
        text = log_path.read_text(errors="replace")
        assert "Traceback" not in text, text[-6000:]
        assert text.count("Loading model smollm2-135m") == 1  # warm start: the answers loaded nothing
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        timings["total_s"] = time.monotonic() - t0
        (ARTIFACTS / "quickstart-timings.json").write_text(json.dumps(timings, indent=1))
        print("quick start timings:", json.dumps(timings))


# Run with the clone's Python: one audio response over the Realtime WebSocket, as the SDK gives it.
_AUDIO_TURN = """
import asyncio, base64, json, sys
from openai import AsyncOpenAI

async def main():
    host = sys.argv[1]
    client = AsyncOpenAI(api_key="sk-anything", base_url=f"http://{host}/v1", websocket_base_url=f"ws://{host}/v1")
    audio, transcript = 0, ""
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Say hello."}]})
        await conn.response.create()
        async for event in conn:
            if event.type == "response.output_audio.delta":
                audio += len(base64.b64decode(event.delta))
            elif event.type == "response.output_audio_transcript.delta":
                transcript += event.delta
            elif event.type == "response.done":
                break
    print(json.dumps({"audio_bytes": audio, "transcript": transcript}))

asyncio.run(main())
"""
