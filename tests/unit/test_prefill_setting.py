"""`llm_prefill`: on, off, or "auto" (server_vad turns only), as settings and as the engine reads it."""

from __future__ import annotations

import pytest

from openrealtime.config import Settings
from openrealtime.engine.prefill import prefill_wanted


def test_auto_prefills_server_vad_turns_only() -> None:
    assert prefill_wanted("auto", semantic=False) is True
    assert prefill_wanted("auto", semantic=True) is False
    for semantic in (False, True):
        assert prefill_wanted(True, semantic=semantic) is True
        assert prefill_wanted(False, semantic=semantic) is False


def test_the_setting_parses_booleans_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENREALTIME_LLM_PREFILL", raising=False)
    assert Settings().llm_prefill == "auto"
    for raw, parsed in (("true", True), ("false", False), ("auto", "auto"), ("1", True), ("0", False)):
        monkeypatch.setenv("OPENREALTIME_LLM_PREFILL", raw)
        assert Settings().llm_prefill == parsed
    monkeypatch.setenv("OPENREALTIME_LLM_PREFILL", "sometimes")
    with pytest.raises(ValueError):
        Settings()
