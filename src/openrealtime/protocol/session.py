"""The session object (GA Realtime shape) with the value ranges the server enforces.

Models are strict about unknown fields (``extra="forbid"``) so a typo in a client's
``session.update`` is reported with its exact ``param`` instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

Modality = Literal["text", "audio"]
# OpenAI's own model names, which every OpenAI client sends: the default model serves them quietly
# (no substitution logged), even with `strict_names`.
OPENAI_REALTIME_MODEL = re.compile(r"^gpt-[\w.-]*realtime", re.IGNORECASE)
OPENAI_TRANSCRIPTION_MODEL = re.compile(r"^(whisper-1|gpt-4o[\w.-]*-transcribe[\w.-]*)$", re.IGNORECASE)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AudioFormat(_Model):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: Literal[24000] | None = None

    @model_validator(mode="after")
    def _rate(self) -> AudioFormat:
        # PCM is always 24 kHz; G.711 is always 8 kHz and carries no rate field on the wire.
        if self.type == "audio/pcm":
            object.__setattr__(self, "rate", 24000)
        elif self.rate is not None:
            object.__setattr__(self, "rate", None)
        return self

    @property
    def sample_rate(self) -> int:
        return 24000 if self.type == "audio/pcm" else 8000


class NoiseReduction(_Model):
    type: Literal["near_field", "far_field"]


class Transcription(_Model):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class ServerVad(_Model):
    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=10_000)
    silence_duration_ms: int = Field(500, ge=0, le=10_000)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = Field(None, ge=5_000, le=30_000)


class SemanticVad(_Model):
    type: Literal["semantic_vad"] = "semantic_vad"
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    create_response: bool = True
    interrupt_response: bool = True


TurnDetection = Annotated[ServerVad | SemanticVad, Field(discriminator="type")]


class AudioInput(_Model):
    format: AudioFormat = Field(default_factory=AudioFormat)
    noise_reduction: NoiseReduction | None = None
    transcription: Transcription | None = None
    turn_detection: TurnDetection | None = Field(default_factory=ServerVad)


class AudioOutput(_Model):
    format: AudioFormat = Field(default_factory=AudioFormat)
    voice: str = "alloy"
    speed: float = Field(1.0, ge=0.25, le=1.5)
    model: str | None = None


class AudioConfig(_Model):
    input: AudioInput = Field(default_factory=AudioInput)
    output: AudioOutput = Field(default_factory=AudioOutput)


class FunctionTool(_Model):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class McpToolFilter(_Model):
    """Which of an MCP server's tools a rule covers: by name and/or by the `readOnlyHint` annotation."""

    tool_names: list[str] | None = None
    read_only: bool | None = None

    def matches(self, name: str, annotations: dict[str, Any] | None) -> bool:
        """A tool matches when it passes every criterion given (an empty filter matches none)."""
        if self.tool_names is None and self.read_only is None:
            return False
        if self.tool_names is not None and name not in self.tool_names:
            return False
        return self.read_only is None or bool((annotations or {}).get("readOnlyHint")) == self.read_only


class McpApprovalFilter(_Model):
    always: McpToolFilter | None = None
    never: McpToolFilter | None = None


class McpTool(_Model):
    """A remote MCP server whose tools the server lists, offers to the model and calls itself.

    Only `server_url` servers: connectors and tunnels are OpenAI-hosted services this server has not.
    """

    type: Literal["mcp"]
    server_label: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    server_url: str | None = None
    server_description: str | None = None
    headers: dict[str, str] | None = None
    authorization: str | None = None
    allowed_tools: list[str] | McpToolFilter | None = None
    require_approval: Literal["always", "never"] | McpApprovalFilter | None = None
    connector_id: str | None = None
    tunnel_id: str | None = None
    allowed_callers: list[Literal["direct", "programmatic"]] | None = None
    defer_loading: bool | None = None

    @field_validator("connector_id", "tunnel_id")
    @classmethod
    def _hosted_only(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("connectors and MCP tunnels are not available on this server; give a 'server_url'")
        return v

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("server_url must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _has_url(self) -> McpTool:
        if self.server_url is None:
            raise ValueError("mcp tools need a 'server_url'")
        return self

    def allows(self, name: str, annotations: dict[str, Any] | None) -> bool:
        """`allowed_tools`: whether the model may see this tool of the server."""
        if self.allowed_tools is None:
            return True
        if isinstance(self.allowed_tools, list):
            return name in self.allowed_tools
        return self.allowed_tools.matches(name, annotations)

    def needs_approval(self, name: str, annotations: dict[str, Any] | None) -> bool:
        """`require_approval`: the hosted default is "always"; a filter's `never` wins over `always`."""
        rule = self.require_approval
        if rule is None or rule == "always":
            return True
        if rule == "never":
            return False
        if rule.never is not None and rule.never.matches(name, annotations):
            return False
        if rule.always is not None:
            return rule.always.matches(name, annotations)
        return True


def _tool_kind(v: Any) -> str:
    kind = v.get("type", "function") if isinstance(v, dict) else getattr(v, "type", "function")
    return "mcp" if kind == "mcp" else "function"


Tool = Annotated[Annotated[FunctionTool, Tag("function")] | Annotated[McpTool, Tag("mcp")],
                 Discriminator(_tool_kind)]


class ToolChoiceFunction(_Model):
    type: Literal["function"]
    name: str


class ToolChoiceMcp(_Model):
    type: Literal["mcp"]
    server_label: str
    name: str | None = None


ToolChoice = (
    Literal["auto", "none", "required"]
    | Annotated[ToolChoiceFunction | ToolChoiceMcp, Field(discriminator="type")]
)


class TokenLimits(_Model):
    post_instructions: int | None = Field(None, ge=1)


class RetentionRatio(_Model):
    type: Literal["retention_ratio"]
    retention_ratio: float = Field(ge=0.0, le=1.0)
    token_limits: TokenLimits | None = None


class TracingConfig(_Model):
    workflow_name: str | None = None
    group_id: str | None = None
    metadata: dict[str, Any] | None = None


class PromptText(_Model):
    type: Literal["input_text"]
    text: str


class PromptImage(_Model):
    type: Literal["input_image"]
    detail: Literal["low", "high", "auto", "original"] = "auto"
    file_id: str | None = None
    image_url: str | None = None


class PromptFile(_Model):
    type: Literal["input_file"]
    detail: Literal["auto", "low", "high"] | None = None
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


PromptVariable = str | Annotated[PromptText | PromptImage | PromptFile, Field(discriminator="type")]


class Prompt(_Model):
    """A stored prompt reference, shaped as the official SDK types require (`id`; typed variables).

    Local models have no stored prompts; the reference is kept and echoed, so it must be one the
    client's own types accept back.
    """

    id: str = Field(min_length=1)
    version: str | None = None
    variables: dict[str, PromptVariable] | None = None


class Reasoning(_Model):
    """Reasoning settings of reasoning models; accepted and echoed, unused by local models."""

    effort: Literal["minimal", "low", "medium", "high", "xhigh"] | None = None


MaxTokens = Annotated[int, Field(ge=1, le=4096)] | Literal["inf"]
SessionType = Literal["realtime", "transcription"]
LOGPROBS = "item.input_audio_transcription.logprobs"


class SessionConfig(_Model):
    """The effective configuration of a realtime session, as echoed in session.created/updated."""

    # "transcription": audio in, transcripts out, never a response (see TranscriptionSessionUpdate).
    type: SessionType = "realtime"
    object: Literal["realtime.session"] = "realtime.session"
    id: str = ""
    model: str = ""
    instructions: str = ""
    output_modalities: list[Modality] = Field(default_factory=lambda: ["audio"], min_length=1)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    max_output_tokens: MaxTokens = "inf"
    audio: AudioConfig = Field(default_factory=AudioConfig)
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    truncation: Literal["auto", "disabled"] | RetentionRatio = "auto"
    tracing: Literal["auto"] | TracingConfig | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None
    expires_at: int = 0
    # Accepted for compatibility with clients that send them; not used by local models.
    prompt: Prompt | None = None
    reasoning: Reasoning | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("output_modalities")
    @classmethod
    def _dedupe(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @property
    def logprobs(self) -> bool:
        """The client asked for transcription logprobs (`include`)."""
        return LOGPROBS in (self.include or [])

    def wire(self) -> dict[str, Any]:
        """JSON shape sent to clients (None-valued optional fields omitted)."""
        if self.type == "transcription":
            return self._transcription_wire()
        data = self.model_dump(mode="json", exclude_none=True)
        # `tracing: null` and `noise_reduction` / `transcription` / `turn_detection: null` are
        # meaningful, so keep them explicit.
        data["tracing"] = self.model_dump(mode="json")["tracing"]
        audio_in = data["audio"]["input"]
        for key in ("noise_reduction", "transcription", "turn_detection"):
            audio_in.setdefault(key, None)
        if isinstance(audio_in["turn_detection"], dict) and audio_in["turn_detection"]["type"] == "server_vad":
            audio_in["turn_detection"].setdefault("idle_timeout_ms", None)
        # What the hosted API sends as null when unset.
        data.setdefault("prompt", None)
        data.setdefault("include", None)
        # An MCP server's credentials are write-only: session events reach sideband controllers,
        # logs and browser pages that must not learn the key the server calls the MCP server with.
        for tool in data.get("tools") or []:
            if tool.get("type") == "mcp":
                tool.pop("authorization", None)
                tool.pop("headers", None)
        return data

    def _transcription_wire(self) -> dict[str, Any]:
        """A transcription session in the GA shape (`RealtimeTranscriptionSessionCreateRequest`
        plus the read-only id/object/expires_at the hosted API adds): only what applies to it."""
        data = self.model_copy(update={"type": "realtime"}).wire()
        audio_in = data["audio"]["input"]
        if isinstance(audio_in["turn_detection"], dict):
            # Nothing is ever answered in a transcription session: these have no meaning there.
            for key in ("create_response", "interrupt_response"):
                audio_in["turn_detection"].pop(key, None)
        return {"type": "transcription", "object": "realtime.transcription_session", "id": self.id,
                "expires_at": self.expires_at, "audio": {"input": audio_in}, "include": data["include"]}


class TranscriptionAudioInput(_Model):
    format: AudioFormat | None = None
    noise_reduction: NoiseReduction | None = None
    transcription: Transcription | None = None
    turn_detection: TurnDetection | None = None


class TranscriptionAudio(_Model):
    input: TranscriptionAudioInput | None = None


class TranscriptionSessionUpdate(_Model):
    """What a `session.update` / initial session of type "transcription" may carry (GA shape).

    Only checked, never stored: it rejects the realtime-only fields (instructions, tools, audio
    output, ...) with their exact `param`; the update is then merged into the SessionConfig.
    """

    type: Literal["transcription"]
    audio: TranscriptionAudio | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


# Fields a client may send back unchanged but never change.
READ_ONLY_FIELDS = ("id", "object", "expires_at")

def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge a partial `session.update` into the current session dict.

    Nested objects merge key by key, except that a turn_detection of a new type replaces the old
    one whole (its fields differ per type) and an explicit null always clears.
    """
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            if "type" in value and value.get("type") != old.get("type"):
                out[key] = value
            else:
                out[key] = deep_merge(old, value)
        else:
            out[key] = value
    return out
