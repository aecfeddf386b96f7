"""Start the real server process once per test session and hand tests its address and key."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from .zod_check import assert_valid_zod

API_KEY = "sk-test-openrealtime"
_SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def assert_valid_server_event(event: dict) -> None:
    """Every event we emit must validate strictly against the official SDKs' types: openai-python's
    `openai.types.realtime`, and the `@openai/agents` JS SDK's zod schemas and item parsing (the
    strictest client we know; see zod_check.py)."""
    _SERVER_EVENT.validate_python(event, strict=True)
    assert_valid_zod(event)


def invalid_events(events: list[dict]) -> list[tuple[str | None, str]]:
    """(type, reason) of every event that fails `assert_valid_server_event`: all of them, not the first."""
    invalid = []
    for event in events:
        try:
            assert_valid_server_event(event)
        except Exception as exc:
            invalid.append((event.get("type"), str(exc)[:500]))
    return invalid


def assert_answered(response: dict) -> None:
    """A response ran to its end: completed, or cut at the reply cap.

    The test model (smollm2-135m, sampled at the default temperature) now and then loops on one
    sentence until max_output_tokens; that is a normal answer, not a failed or cancelled one.
    """
    status, details = response["status"], response.get("status_details") or {}
    assert status == "completed" or (status == "incomplete" and details.get("reason") == "max_output_tokens"), \
        response


def client(server: Server, key: str | None = None) -> AsyncOpenAI:
    """The official SDK pointed at our server (HTTP and WebSocket)."""
    return AsyncOpenAI(api_key=key or server.api_key, base_url=f"{server.base_url}/v1",
                       websocket_base_url=f"{server.ws_url}/v1")


async def collect(conn: Any, until: str, timeout: float = 90) -> list[dict]:
    """Validated server events (as dicts) up to and including the first of type `until`."""
    out: list[dict] = []
    async with asyncio.timeout(timeout):
        async for event in conn:
            data = event.to_dict()
            assert_valid_server_event(data)
            out.append(data)
            if data["type"] == until:
                return out
    raise AssertionError(f"connection ended before {until}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(extra_env: dict[str, str] | None = None, name: str = "server", preload: bool = True,
                 port: int | None = None) -> Server:
    """The server in a subprocess, once /healthz answers; `preload=False`: it listens while its models load.

    `port`: a fixed one (a node restarted where its load balancer expects it); default: a free one.
    """
    port = port or free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / f"{name}-{port}.log"
    env = {
        **os.environ,
        "OPENREALTIME_API_KEYS": f'["{API_KEY}"]',
        "OPENREALTIME_LLM_MODEL": "smollm2-135m",
        "OPENREALTIME_ICE__ADDRESSES": '["127.0.0.1"]',
        "OPENREALTIME_ICE__GATHER_INTERFACES": "false",
        # stop_server's SIGTERM drains: keep the grace period well inside its 15 s wait
        "OPENREALTIME_DRAIN_GRACE_S": "3",
        **(extra_env or {}),
    }
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrealtime.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         *(["--preload"] if preload else []), "--log-level", os.environ.get("OPENREALTIME_TEST_LOG_LEVEL", "info")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return Server(base, API_KEY, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    srv = start_server()
    yield srv
    stop_server(srv)
    # A clean shutdown is part of the contract: no tracebacks or "Task was destroyed" in the log.
    text = srv.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Task was destroyed" not in text, text[-4000:]
