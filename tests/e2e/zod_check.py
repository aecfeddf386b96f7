"""Validate server events with the zod schemas of the OpenAI Agents JS SDK, from Python tests.

The Python `openai.types.realtime` models are lenient (optional fields may be absent); the
`@openai/agents` SDK's zod schemas are not, and an event they reject is silently ignored by the SDK
or, for items, throws inside its transport. `assert_valid_zod(event)` runs the event through
tests/e2e/js/validate.mjs — the SDK's own schemas and message handling — in one Node process
started on first use and kept for the whole test session.

Without Node/npm: a failure in CI; locally a warning once, and events are not checked.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import threading
import warnings
from typing import Any

import pytest

from .js_sdk import js_sdk_dir, node_path

__all__ = ["ZodValidator", "assert_valid_zod", "zod_validator"]


class ZodValidator:
    """A running `node validate.mjs`: one event in, one verdict out."""

    def __init__(self) -> None:
        js_dir = js_sdk_dir()
        self._proc = subprocess.Popen(
            [node_path(), str(js_dir / "validate.mjs")], cwd=js_dir, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._lock = threading.Lock()
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"validate.mjs did not start: {ready}")
        self.sdk_version: str = ready["sdk_version"]
        # The event types the SDK checks with a typed schema; others it accepts as generic events.
        self.typed_event_types: frozenset[str] = frozenset(ready["typed_event_types"])

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            err = self._proc.stderr.read() if self._proc.stderr else ""
            raise RuntimeError(f"validate.mjs exited ({self._proc.poll()}): {err[-3000:]}")
        return json.loads(line)

    def check(self, event: dict) -> dict[str, Any]:
        """{"ok", "type", "typed", "errors"} for one server event."""
        with self._lock:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"ref": None, "event": event}) + "\n")
            self._proc.stdin.flush()
            return self._read()

    def close(self) -> None:
        if self._proc.poll() is None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


_validator: ZodValidator | None = None
_unavailable: str | None = None
_start_lock = threading.Lock()


def zod_validator() -> ZodValidator | None:
    """The session's validator, started on first use; None locally when Node is missing."""
    global _validator, _unavailable
    with _start_lock:
        if _validator is None and _unavailable is None:
            try:
                _validator = ZodValidator()
            except pytest.skip.Exception as exc:  # only outside CI: in CI js_sdk_dir() fails instead
                _unavailable = str(exc)
                warnings.warn(f"events are not checked with the @openai/agents zod schemas: {exc}", stacklevel=2)
            else:
                atexit.register(_validator.close)
        return _validator


def format_failure(verdict: dict[str, Any]) -> str:
    lines = [f"{verdict.get('type')!r} fails the @openai/agents SDK's zod check:"]
    for error in verdict.get("errors", []):
        lines.append(f"  [{error.get('step')}] {error.get('message')}")
        if error.get("effect"):
            lines.append(f"    effect: {error['effect']}")
        for issue in error.get("issues", []):
            lines.append(f"    {json.dumps(issue)}")
    return "\n".join(lines)


def assert_valid_zod(event: dict) -> None:
    """Fail unless the @openai/agents SDK accepts `event` with its own schemas and handling."""
    validator = zod_validator()
    if validator is None:
        return
    verdict = validator.check(event)
    assert verdict["ok"], format_failure(verdict) + f"\nevent: {json.dumps(event)[:2000]}"
