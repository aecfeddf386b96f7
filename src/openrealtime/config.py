"""Server configuration: environment variables (``OPENREALTIME_*``) and an optional TOML file.

Precedence, highest first: explicit keyword arguments (the CLI), environment, TOML file, defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

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


class ProviderConfig(BaseModel):
    """A remote OpenAI-compatible server (OpenAI, Groq, vLLM, llama.cpp's server, another openrealtime).

    Sessions pick one of its models with ``model: "<provider>/<model>"``; ``llm_model``,
    ``stt_provider`` and ``tts_provider`` can name it too.
    """

    # The API root, including the version prefix: requests go to <base_url>/chat/completions etc.
    base_url: str
    api_key: str | None = Field(default=None, repr=False)
    # Name of an environment variable holding the key (keeps secrets out of the TOML file).
    api_key_env: str | None = None
    kind: Literal["openai"] = "openai"
    # Longest wait for the next byte of an answer (first token included), and for connecting.
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    # Connect errors (nothing sent yet) are retried this many times with exponential backoff.
    connect_retries: int = 2
    # The models' context window, used for context management (the API does not report it).
    context_length: int = 8192
    # Models listed in /v1/models as "<provider>/<model>" (any model name is accepted anyway).
    models: list[str] = Field(default_factory=list)
    # Extra HTTP headers sent with every request.
    headers: dict[str, str] = Field(default_factory=dict)
    # Ask for token usage in the stream (stream_options.include_usage); turned off automatically
    # for servers that reject it.
    stream_usage: bool = True

    def key(self) -> str | None:
        """The API key: ``api_key``, else the environment variable ``api_key_env``."""
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env) if self.api_key_env else None


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
    # semantic_vad's end-of-turn model: smart-turn v3 (the ONNX file the pipecat-ai wheel ships).
    turn_detector_enabled: bool = True
    turn_detector_model: str | None = None  # a smart-turn v3 ONNX file; default: pipecat-ai's
    turn_detector_threads: int = 1
    # audio.input.noise_reduction: "rnnoise" (pyrnnoise), "webrtc" (webrtc-noise-gain) or "off".
    noise_suppressor: Literal["rnnoise", "webrtc", "off"] = "rnnoise"

    # Remote OpenAI-compatible servers by name: TOML `[providers.NAME]`, or env
    # OPENREALTIME_PROVIDERS='{"NAME": {"base_url": ...}}' (JSON).
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    # Speech to text / text to speech on a provider instead of the local Whisper / Piper.
    stt_provider: str | None = None
    stt_remote_model: str = "whisper-1"
    tts_provider: str | None = None
    tts_remote_model: str = "tts-1"
    # Voices the remote TTS offers (the API cannot list them); empty = accept any name.
    tts_remote_voices: list[str] = Field(
        default_factory=lambda: ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                                 "shimmer", "verse", "marin", "cedar"])

    default_instructions: str = (
        "You are a helpful, concise voice assistant. Answer in one or two short sentences."
    )
    session_ttl_s: int = 3600
    # Largest client event we accept, in bytes (base64 audio chunks included).
    max_event_bytes: int = 15 * 1024 * 1024
    # Rate limits per API key, shared by all its sessions: responses and LLM tokens (input + output)
    # per minute. None = unlimited. Exceeding one answers response.create with an `error` event
    # (code rate_limit_exceeded); rate_limits.updated reports them after every response.
    rate_limit_requests_per_min: int | None = None
    rate_limit_tokens_per_min: int | None = None

    # Origins whose browser pages may call the API (keys travel as bearer tokens, not cookies).
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])

    # Ephemeral client secrets (`ek_...`, POST /v1/realtime/client_secrets): their lifetime when the
    # request names none; a request may ask for 10..7200 s, as with the hosted API.
    client_secret_ttl_s: int = Field(600, ge=10, le=7200)
    # The browser playground at GET /.
    playground_enabled: bool = True
    # Who may get an ephemeral key from the page's own route (POST /playground/session):
    # "loopback" = requests from this machine only (default), "token" = requests carrying
    # `X-Playground-Token: <playground_token>`, "open" = anyone who can load the page (a public demo),
    # "off" = nobody (the user pastes an API key or an ek_ into the page).
    playground_mode: Literal["loopback", "token", "open", "off"] = "loopback"
    playground_token: str | None = Field(default=None, repr=False)

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
