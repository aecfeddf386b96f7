"""The LLM protocol the engine talks to, and the registry that picks an implementation by name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


@dataclass(slots=True)
class ToolSpec:
    """A function the model may call (JSON-Schema `parameters`)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def openai_schema(self) -> dict[str, Any]:
        """The chat-completions shape (what OpenAI-compatible servers and chat templates expect)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(slots=True)
class ImageInput:
    """An image of a user turn: a URL (``https://...`` or a ``data:image/...;base64,`` URL)."""

    url: str
    detail: Literal["auto", "low", "high"] = "auto"


@dataclass(slots=True)
class ChatMessage:
    """One chat turn in OpenAI chat-completions shape.

    Assistant turns may carry `tool_calls`; a `tool` turn answers the call `tool_call_id`. A user
    turn's `images` reach only backends whose `accepts_images` is true (the engine refuses them
    for the others, engine/content.py), so text-only backends may ignore the field.
    """

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    images: list[ImageInput] | None = None


@dataclass(slots=True)
class GenerationParams:
    temperature: float = 0.8
    # Every output token counts, tool-call markup and schema-forced text included. None ("inf"):
    # the backend's own cap (llama.cpp: 4096, the hosted API's limit), within the context.
    max_tokens: int | None = None
    top_p: float = 0.95
    top_k: int = 40
    # Drop tokens below this share of the most likely one's probability: llama.cpp's default, so the
    # in-process backend samples as llama.cpp's own server does. Without it, at temperature 0.8 a rare
    # word now and then derails a reply: "It is cold and rainy in Paris" over a tool result of "23
    # degrees and sunny" (2 of 40 samples, bench/followup_facts.py; its effect is not measured yet).
    min_p: float = 0.05
    seed: int | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    # "auto" | "none" | "required" | the name of the one function that must be called.
    tool_choice: str = "auto"
    # False: at most one call per response (the client's `parallel_tool_calls`); None: the default, several.
    parallel_tool_calls: bool | None = None
    # The conversation this request continues (the engine's session id): backends that keep
    # per-conversation caches (llama.cpp slots) give its requests the same one. None: match by prefix.
    cache_key: str | None = None
    # The last message is still being written (a user turn still being spoken): evaluate the prompt
    # only up to the end of its text so far, without the template's end of turn (with max_tokens=0;
    # backends with `prefills` only). The finished prompt then goes on from what was evaluated.
    open_last: bool = False


@dataclass(slots=True)
class TextDelta:
    """A piece of generated text (UTF-8 complete: never half a multibyte character)."""

    text: str


@dataclass(slots=True)
class ToolCallDelta:
    """Streamed tool-call output (chat-completions style): the first delta of a call carries its
    `call_id` and `name`; later ones append to `arguments`. Calls are numbered by `index`."""

    index: int
    arguments: str = ""
    call_id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens served from the KV cache instead of being evaluated again.
    cached_tokens: int = 0


@dataclass(slots=True)
class Finished:
    """Always the last item of a stream."""

    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage = field(default_factory=Usage)


LLMEvent = TextDelta | ToolCallDelta | Finished


class LLMError(Exception):
    """A backend failure the engine reports as a failed response (the session goes on)."""

    def __init__(self, message: str, code: str = "llm_error", details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or {}


@runtime_checkable
class LLMBackend(Protocol):
    """Streams a chat completion.

    Closing the iterator early (``aclose()``, task cancellation) must stop generation promptly and
    free the model for the next request; implementations must never block the event loop.
    """

    name: str
    context_length: int
    # Optional: True when the model reads `ChatMessage.images` (absent: text-only).
    # accepts_images: bool

    def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator[LLMEvent]: ...

    async def count_tokens(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> int:
        """Prompt size of `messages` with `tools` offered, as this backend would render them."""
        ...

    async def close(self) -> None: ...
