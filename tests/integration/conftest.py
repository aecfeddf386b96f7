"""Fixtures shared by the integration tests of the real models."""

from __future__ import annotations

from pathlib import Path

import pytest

from openrealtime.backends.gguf import ensure_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M assembled from its package into a fresh cache: the tests' tiny model."""
    return ensure_model("smollm2-135m", tmp_path_factory.mktemp("models"), progress=False)
