"""The OpenAI Agents JS SDK (`@openai/agents`, npm) for e2e tests: Node, and the pinned npm packages
of tests/e2e/js installed with `npm ci` from the committed package-lock.json when they are missing.

Without Node/npm the tests skip locally and fail in CI, where they must run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .chromium import in_ci

JS_DIR = Path(__file__).resolve().parent / "js"
MIN_NODE_MAJOR = 20


def _missing(problem: str) -> None:
    if in_ci():
        pytest.fail(f"the JS SDK tests cannot run in CI: {problem}", pytrace=False)
    pytest.skip(problem)


def _installed() -> bool:
    """Every dependency pinned in package.json is in node_modules at exactly that version."""
    pinned = json.loads((JS_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        meta = JS_DIR / "node_modules" / name / "package.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("version") != version:
            return False
    return True


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """One `npm ci` at a time, also across pytest processes."""
    with open(JS_DIR / ".npm-install.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def node_path() -> str:
    """Node's path, checked to be recent enough; skips (locally) or fails (CI) without it."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        _missing("node and npm are not on PATH (Node >= 20 is needed for the @openai/agents tests)")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = int(out.lstrip("v").split(".")[0]) if out.startswith("v") else 0
    if major < MIN_NODE_MAJOR:
        _missing(f"node {out or '?'} is too old: need >= {MIN_NODE_MAJOR}")
    return node


def js_sdk_dir() -> Path:
    """tests/e2e/js with its npm packages installed (`npm ci` if they are missing or stale)."""
    node_path()
    with _install_lock():
        if not _installed():
            npm = shutil.which("npm")
            assert npm is not None
            result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True,
                                    text=True, timeout=600)
            if result.returncode != 0 or not _installed():
                pytest.fail(f"npm ci in {JS_DIR} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                            f"{result.stderr[-3000:]}", pytrace=False)
    return JS_DIR
