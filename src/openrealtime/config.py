"""Server configuration: environment variables (``OPENREALTIME_*``) and an optional TOML file.

Precedence, highest first: explicit keyword arguments (the CLI), environment, TOML file, defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class IceConfig(BaseModel):
    """What clients are told about STUN/TURN, and which local addresses our ICE agent offers."""

    stun_urls: list[str] = Field(default_factory=list)
    turn_urls: list[str] = Field(default_factory=list)
    # Shared secret of a coturn server in `use-auth-secret` mode (TURN REST credentials).
    turn_secret: str | None = None
    turn_ttl_s: int = 3600
    # Host addresses to put in our SDP answers in addition to aioice's own gathering.
    # aioice skips loopback, so "127.0.0.1" must be listed to accept calls from this machine;
    # behind NAT, list the public IP here.
    addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    # Let aioice gather the machine's non-loopback interface addresses as well.
    gather_interfaces: bool = True


class Settings(BaseSettings):
    """Everything the server reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="OPENREALTIME_", env_nested_delimiter="__", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # API keys accepted as `Authorization: Bearer <key>` / `Basic <key>`; empty = open (loopback only).
    api_keys: list[str] = Field(default_factory=list)

    # LLM: a model name from the registry (qwen2.5-1.5b, qwen2.5-0.5b, smollm2-135m) or a .gguf path.
    llm_model: str = "qwen2.5-1.5b"
    llm_context: int = 4096
    llm_threads: int = 0
    # Allow sessions to pick any local .gguf path through the session `model` field.
    allow_model_paths: bool = False
    model_cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "openrealtime"
    )

    # Speech stages (offline defaults: Silero VAD, Whisper tiny.en, Piper en_US-joe-medium).
    vad_enabled: bool = True
    vad_threads: int = 1
    vad_model: str | None = None  # a Silero v6 ONNX file; default: the one faster-whisper ships
    stt_enabled: bool = True
    stt_model: str | None = None  # a CTranslate2 Whisper directory; default: the bundled tiny.en
    stt_threads: int = 2
    stt_beam_size: int = 1
    stt_compute_type: str = "int8"
    tts_enabled: bool = True
    tts_model: str | None = None  # a Piper .onnx voice; default: the bundled en_US-joe-medium
    tts_config: str | None = None
    tts_threads: int = 1

    default_instructions: str = (
        "You are a helpful, concise voice assistant. Answer in one or two short sentences."
    )
    session_ttl_s: int = 3600
    # Largest client event we accept, in bytes (base64 audio chunks included).
    max_event_bytes: int = 15 * 1024 * 1024

    # Origins whose browser pages may call the API (keys travel as bearer tokens, not cookies).
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])

    ice: IceConfig = Field(default_factory=IceConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


_TOML_PATH: Path | None = None


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if _TOML_PATH is None:
            return {}
        with open(_TOML_PATH, "rb") as fh:
            return tomllib.load(fh)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults < TOML file < environment < overrides."""
    global _TOML_PATH
    path = config_file or os.environ.get("OPENREALTIME_CONFIG")
    _TOML_PATH = Path(path) if path else None
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _TOML_PATH = None
