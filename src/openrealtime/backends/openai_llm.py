"""LLM backend for any OpenAI-compatible ``/chat/completions`` server (OpenAI, Groq, vLLM, llama.cpp, ...).

Streams with server-sent events over httpx and maps the chunks to the engine's LLM protocol:
``delta.content`` -> ``TextDelta``, ``delta.tool_calls`` -> ``ToolCallDelta``, the final chunk's
``finish_reason`` and the ``usage`` chunk (``stream_options.include_usage``) -> ``Finished``.

Failures become ``LLMError`` with a code the engine puts in ``response.done`` ``status_details``:

- ``upstream_unreachable``: could not connect (after ``connect_retries`` retries with backoff;
  connect errors are the only ones retried, and only before any output was produced),
- ``upstream_rate_limited``: HTTP 429,
- ``upstream_auth_failed``: HTTP 401/403 (wrong or missing API key),
- ``upstream_error``: any other HTTP error status (5xx, 4xx) or an error object inside the stream,
  the message carries the upstream status and error message, ``details`` the parsed body; also a
  chunk of the wrong shape (``choices: 7``, ``delta: "oops"``, a token count that is a string),
  with ``details.reason`` ``malformed_response``,
- ``context_length_exceeded``: the upstream said the prompt is too long,
- ``upstream_timeout``: no byte for ``timeout`` seconds while waiting for the answer,
- ``upstream_disconnected``: the stream ended before the completion did (server died mid-stream).

Leaving the stream early (``aclose()``, task cancellation) closes the HTTP response at once, which
makes the upstream stop generating; nothing is left open.

``count_tokens`` has no tokenizer to ask: it estimates about four characters per token (plus a few
tokens of chat-template overhead per message), which is what context management needs; usage in
``Finished`` comes from the server itself.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from openrealtime.backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    LLMError,
    LLMEvent,
    TextDelta,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from openrealtime.backends.openai_http import (
    RemoteEndpoint,
    UpstreamFailure,
    malformed_response,
    upstream_error_message,
)
from openrealtime.protocol.errors import ProtocolError
from openrealtime.protocol.limits import loads_limited

logger = logging.getLogger(__name__)

# Characters per token for the token estimate (English text with BPE vocabularies: ~4).
CHARS_PER_TOKEN = 4
# Chat-template tokens around each message (role markers, separators).
TOKENS_PER_MESSAGE = 4
_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "stop",
    "eos": "stop",
    "eos_token": "stop",
}


class _Malformed(ValueError):
    """A chunk field of the wrong type; becomes ``malformed_response`` (an upstream_error)."""


def _token_count(value: Any, field: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _Malformed(f"usage.{field} is {value!r:.50}, not a token count")
    return int(value)


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        raise _Malformed(f"usage is {type(raw).__name__}, not an object")
    details = raw.get("prompt_tokens_details")
    if details is None:
        details = {}
    if not isinstance(details, dict):
        raise _Malformed("usage.prompt_tokens_details is not an object")
    return Usage(prompt_tokens=_token_count(raw.get("prompt_tokens"), "prompt_tokens"),
                 completion_tokens=_token_count(raw.get("completion_tokens"), "completion_tokens"),
                 cached_tokens=_token_count(details.get("cached_tokens"), "prompt_tokens_details.cached_tokens"))


def message_to_openai(message: ChatMessage) -> dict[str, Any]:
    """One ``ChatMessage`` in chat-completions request shape."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.images:  # chat-completions content parts: the text, then each image
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
        parts += [{"type": "image_url", "image_url": {"url": image.url, "detail": image.detail}}
                  for image in message.images]
        out["content"] = parts
    if message.role == "assistant" and message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id or ""
    return out


def tools_to_openai(params: GenerationParams) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` request fields (nothing when no tools are offered)."""
    if not params.tools:
        return {}
    tools = [spec.openai_schema() for spec in params.tools]
    choice: Any = params.tool_choice or "auto"
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    fields: dict[str, Any] = {"tools": tools, "tool_choice": choice}
    if params.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = params.parallel_tool_calls
    return fields


class _CallMap:
    """Numbers streamed tool calls 0, 1, ... whatever the upstream does.

    The first delta of a call gets its id and name; continuations only carry argument text. Some
    servers repeat the id and name on every delta, omit ``index``, or reuse index 0 for every call
    (a new id then means a new call).
    """

    def __init__(self) -> None:
        self._by_upstream: dict[int, tuple[int, str | None]] = {}  # upstream index -> (ours, id)
        self._count = 0

    def delta(self, call: Any, position: int) -> ToolCallDelta:
        if not isinstance(call, dict):
            raise _Malformed(f"delta.tool_calls[{position}] is {type(call).__name__}, not an object")
        upstream = call.get("index")
        if not isinstance(upstream, int):
            upstream = position
        function = call.get("function") or {}
        if not isinstance(function, dict):
            raise _Malformed(f"delta.tool_calls[{position}].function is not an object")
        call_id = call.get("id") or None
        if call_id is not None and not isinstance(call_id, (str, int)):
            raise _Malformed(f"delta.tool_calls[{position}].id is not a string")
        call_id = None if call_id is None else str(call_id)
        name = function.get("name")
        if name is not None and not isinstance(name, str):
            raise _Malformed(f"delta.tool_calls[{position}].function.name is not a string")
        arguments = function.get("arguments") or ""
        if not isinstance(arguments, str):  # a few servers send the arguments as an object
            arguments = json.dumps(arguments)
        known = self._by_upstream.get(upstream)
        if known is not None and (call_id is None or call_id == known[1]):
            return ToolCallDelta(index=known[0], arguments=arguments)
        index = self._count
        self._count += 1
        self._by_upstream[upstream] = (index, call_id)
        return ToolCallDelta(index=index, arguments=arguments, call_id=call_id or f"call_{secrets.token_hex(12)}",
                             name=name or "")


class OpenAICompatLLM:
    """Implements ``LLMBackend`` on a remote OpenAI-compatible chat-completions endpoint."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str = "",
        *,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        connect_retries: int = 2,
        retry_backoff_s: float = 0.25,
        context_length: int = 8192,
        name: str | None = None,
        headers: dict[str, str] | None = None,
        stream_usage: bool = True,
        client: httpx.AsyncClient | Callable[[], httpx.AsyncClient] | None = None,
        accepts_images: bool = False,
    ):
        """Cheap: nothing connects until the first request.

        ``timeout`` bounds every wait for bytes from the server (the first token and each next one);
        ``client`` (or a function returning it, called on each request) lets several backends of
        one provider share a connection pool; the caller then closes it. ``accepts_images``: the
        model is vision-capable (the provider's ``vision`` setting), so images are sent as
        ``image_url`` content parts; the API cannot tell us, so it is configured.
        """
        self.model = model
        self.accepts_images = accepts_images
        self.name = name or model or base_url.rstrip("/")
        self.context_length = context_length
        self._stream_usage = stream_usage
        self._endpoint = RemoteEndpoint(
            base_url, api_key, timeout=timeout, connect_timeout=connect_timeout, connect_retries=connect_retries,
            retry_backoff_s=retry_backoff_s, headers={"Accept": "text/event-stream", **(headers or {})},
            name=self.name, client=client)
        self._closed = False

    @property
    def base_url(self) -> str:
        return self._endpoint.base_url

    def __repr__(self) -> str:
        return f"OpenAICompatLLM(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"

    # --- LLMBackend ---

    def request_body(self, messages: list[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        """The JSON body of the chat-completions request (public for tests and debugging)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [message_to_openai(m) for m in messages],
            "stream": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if self._stream_usage:
            body["stream_options"] = {"include_usage": True}
        if params.max_tokens is not None:
            body["max_tokens"] = max(1, params.max_tokens)
        if params.seed is not None:
            body["seed"] = params.seed
        body.update(tools_to_openai(params))
        return body

    async def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator[LLMEvent]:
        if self._closed:
            raise LLMError("The backend is closed", code="model_closed")
        body = self.request_body(messages, params)
        while True:
            try:
                async with self._endpoint.request("POST", "chat/completions", json=body) as response:
                    async for event in self._events(response, messages):
                        yield event
                    return
            except UpstreamFailure as failure:
                if failure.status == 400 and "stream_options" in body and "stream_options" in str(failure):
                    # An older server that rejects stream_options: ask again without it.
                    logger.info("%s: upstream rejects stream_options; not asking for usage", self.name)
                    self._stream_usage = False
                    body.pop("stream_options")
                    continue
                details: dict[str, Any] = {"provider": self.name, **failure.details}
                if failure.status is not None:
                    details.update(status=failure.status, upstream_code=failure.upstream_code,
                                   upstream_error=failure.body)
                raise LLMError(str(failure), code=failure.code, details=details) from failure

    async def _events(self, response: httpx.Response, messages: list[ChatMessage]) -> AsyncIterator[LLMEvent]:
        """Parse the SSE stream; every event the engine sees ends with exactly one ``Finished``.

        Without a usage chunk (servers that ignore ``include_usage``), usage is estimated: the prompt
        with ``count_tokens`` and the completion as one token per streamed chunk.
        """
        finish: str | None = None
        chunks = 0
        usage: Usage | None = None
        saw_tool_calls = False
        done = False
        calls = _CallMap()
        data_lines: list[str] = []

        def handle(payload: str) -> list[LLMEvent]:
            nonlocal finish, usage, saw_tool_calls, done, chunks
            payload = payload.strip()
            if not payload:
                return []
            if payload == "[DONE]":
                done = True
                return []
            try:
                chunk = loads_limited(payload)
            except ProtocolError as exc:
                if exc.code == "nesting_too_deep":
                    raise _Malformed("a chunk nests too deep") from None
                logger.debug("%s: ignoring a non-JSON SSE event: %.200s", self.name, payload)
                return []
            if not isinstance(chunk, dict):
                return []
            if chunk.get("error"):
                message, upstream_code = upstream_error_message(chunk, payload)
                raise LLMError(f"Upstream {self.name} failed mid-stream: {message}", code="upstream_error",
                               details={"provider": self.name, "upstream_code": upstream_code,
                                        "upstream_error": chunk["error"]})
            out: list[LLMEvent] = []
            if chunk.get("usage") is not None:
                usage = _usage(chunk["usage"])
            choices = chunk.get("choices")
            if choices is None:
                choices = []
            if not isinstance(choices, list):
                raise _Malformed(f"choices is {type(choices).__name__}, not a list")
            for choice in choices:
                if not isinstance(choice, dict):
                    raise _Malformed(f"a choice is {type(choice).__name__}, not an object")
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta")
                if delta is None:
                    delta = {}
                if not isinstance(delta, dict):
                    raise _Malformed(f"choices[0].delta is {type(delta).__name__}, not an object")
                text = delta.get("content")
                if text is not None and not isinstance(text, str):
                    raise _Malformed("choices[0].delta.content is not a string")
                tool_calls = delta.get("tool_calls")
                if tool_calls is None:
                    tool_calls = []
                if not isinstance(tool_calls, list):
                    raise _Malformed("choices[0].delta.tool_calls is not a list")
                if text:
                    out.append(TextDelta(text))
                if text or tool_calls:
                    chunks += 1
                for position, call in enumerate(tool_calls):
                    saw_tool_calls = True
                    out.append(calls.delta(call, position))
                if choice.get("finish_reason"):
                    finish = str(choice["finish_reason"])
            return out

        def parse(payload: str) -> list[LLMEvent]:
            try:
                return handle(payload)
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                # _Malformed, or a shape the checks above did not foresee: the upstream's fault.
                logger.debug("%s: malformed chunk: %.200s", self.name, payload)
                problem = str(exc) if isinstance(exc, _Malformed) else f"{type(exc).__name__}: {exc}"
                raise malformed_response(self.name, problem) from None

        async for line in response.aiter_lines():
            if line.startswith(":"):  # SSE comment (keep-alive)
                continue
            if line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
                continue
            if line == "" and data_lines:  # end of one SSE event
                payload, data_lines = "\n".join(data_lines), []
                for event in parse(payload):
                    yield event
                if done:
                    break
        else:
            if data_lines:  # last event without its blank line
                for event in parse("\n".join(data_lines)):
                    yield event
        if not done and finish is None:
            raise LLMError(f"The upstream server {self.base_url} ({self.name}) ended the stream before the "
                           "completion finished", code="upstream_disconnected", details={"provider": self.name})
        reason = _FINISH_REASONS.get(finish or "stop", "stop")
        if saw_tool_calls and reason == "stop":
            reason = "tool_calls"
        if usage is None:
            usage = Usage(prompt_tokens=await self.count_tokens(messages), completion_tokens=chunks)
        yield Finished(finish_reason=reason, usage=usage)  # type: ignore[arg-type]

    async def count_tokens(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> int:
        """Estimated prompt size: ~4 characters per token plus per-message overhead (no tokenizer)."""
        total = sum(len(json.dumps(t.openai_schema())) for t in tools or []) // CHARS_PER_TOKEN
        for m in messages:
            chars = len(m.content or "")
            for call in m.tool_calls or []:
                chars += len(call.name) + len(call.arguments)
            total += TOKENS_PER_MESSAGE + (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
        return total + 2

    async def close(self) -> None:
        self._closed = True
        await self._endpoint.close()
