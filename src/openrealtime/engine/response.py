"""One model response: prompt assembly, streaming, and the exact Realtime event sequence."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..audio.codecs import encode_from_pcm16
from ..audio.output import OUTPUT_RATE
from ..audio.quiet import LeadTrimmer, split_tail, tail_keep_bytes
from ..audio.resample import StreamResampler
from ..backends.llm import (
    ChatMessage,
    Finished,
    GenerationParams,
    ImageInput,
    LLMBackend,
    LLMError,
    LLMEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from ..backends.mcp import McpCallError
from ..backends.speech import TTSError
from ..protocol import events as ev
from ..protocol.errors import ProtocolError
from ..protocol.events import ItemReference, ResponseConfig, new_id
from ..protocol.items import ContentPart, Item
from ..protocol.session import FunctionTool, McpTool
from .clauses import ClauseSplitter, speakable
from .content import check_items
from .mcp import McpOffer, approval_outcomes, check_mcp_tools, mcp_tools, request_headers
from .truncation import ContextOverflow, reply_reserve

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)

Status = Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
# Size of each `response.output_audio.delta` (WebSocket): small enough to start playback early.
DELTA_MS = 200
# A clause ending like this ends on a pause the TTS should keep; any other was cut mid-sentence.
_PAUSE_AFTER = re.compile(r"[.!?…,;:\u2014\u2013][\"')\]]*\s*$")
# Generations one response may run after MCP calls (each continues with the results); the last
# one may not call again, so a model that keeps calling still ends.
MAX_MCP_ROUNDS = 4


@dataclass(slots=True)
class SpokenAudio:
    """An assistant item's audio (24 kHz PCM16) and when each clause of its transcript was said."""

    pcm: bytearray = field(default_factory=bytearray)
    clauses: list[tuple[int, int, str]] = field(default_factory=list)  # (start_ms, end_ms, text)

    @property
    def ms(self) -> int:
        return len(self.pcm) // (OUTPUT_RATE * 2 // 1000)

    def transcript_until(self, end_ms: int) -> str:
        """The words heard up to `end_ms`, as closely as clause timing allows."""
        out = []
        for start, stop, text in self.clauses:
            if stop <= end_ms:
                out.append(text)
            elif start < end_ms:
                words = text.split()
                keep = len(words) * (end_ms - start) // max(1, stop - start)  # whole words heard
                if keep:
                    out.append(" ".join(words[:keep]))
                break
        return "".join(out).strip()

    def cut(self, end_ms: int) -> None:
        del self.pcm[end_ms * (OUTPUT_RATE * 2 // 1000):]


@dataclass(slots=True)
class ResolvedResponse:
    """Session defaults with the per-response overrides applied: what this response runs with."""

    instructions: str
    output_modalities: list[str]
    max_output_tokens: int | Literal["inf"]
    temperature: float
    voice: str
    speed: float
    audio_format: dict[str, Any]
    metadata: dict[str, str] | None
    in_conversation: bool
    input: list[Item] | None = None
    tools: list[Any] = field(default_factory=list)
    # "auto" | "none" | "required" | the name of the function that must be called.
    tool_choice: str = "auto"
    parallel_tool_calls: bool | None = None
    # A `tool_choice` of type "mcp" (settled once its server is listed) and the MCP tools offered.
    mcp_choice: Any = None
    mcp: McpOffer = field(default_factory=McpOffer)
    mcp_only: bool = False  # an "mcp" tool_choice without a name: only that server's tools are offered

    def tool_specs(self) -> list[ToolSpec]:
        """Every tool the model is offered: the function tools, then the MCP servers' tools."""
        return ([] if self.mcp_only else tool_specs(self.tools)) + self.mcp.specs


def resolve(session: RealtimeSession, cfg: ResponseConfig | None) -> ResolvedResponse:
    """Merge a `response.create` config over the session (overrides apply to this response only)."""
    s = session.config
    cfg = cfg or ResponseConfig()
    if cfg.conversation not in ("auto", "none"):
        raise ProtocolError("Only the default conversation ('auto') or 'none' is supported.",
                            param="response.conversation")
    voice = cfg.voice or (cfg.audio.output.voice if cfg.audio and cfg.audio.output else None) or s.audio.output.voice
    fmt = (cfg.audio.output.format if cfg.audio and cfg.audio.output and cfg.audio.output.format
           else s.audio.output.format)
    modalities = list(dict.fromkeys(cfg.output_modalities or s.output_modalities))
    session.check_modalities(modalities, "response.output_modalities")
    tools = list(cfg.tools if cfg.tools is not None else s.tools)
    if cfg.tools is not None:
        ctx = session.ctx
        check_mcp_tools(tools, ctx.mcp_allowed_hosts, ctx.mcp is not None, "response.tools")
    choice = cfg.tool_choice if cfg.tool_choice is not None else s.tool_choice
    tool_choice = resolve_tool_choice(
        choice, tools, "response.tool_choice" if cfg.tool_choice is not None else "session.tool_choice")
    items: list[Item] | None = None
    if cfg.input is not None:
        items = []
        for i, entry in enumerate(cfg.input):
            if isinstance(entry, ItemReference):
                items.append(session.conversation.require(entry.id, f"response.input[{i}].id"))
            else:
                items.append(entry)
        check_items(items, session.ctx.accepts_images, s.model, lambda n, _: f"response.input[{n}]")
    else:  # an image stored while a vision model served the session (it may have changed since)
        check_items(session.conversation, session.ctx.accepts_images, s.model,
                    lambda _, item: f"item[{item.id}]")
    return ResolvedResponse(
        instructions=cfg.instructions if cfg.instructions is not None else s.instructions,
        output_modalities=modalities,
        max_output_tokens=cfg.max_output_tokens if cfg.max_output_tokens is not None else s.max_output_tokens,
        temperature=cfg.temperature if cfg.temperature is not None else s.temperature,
        voice=session.check_voice(voice, "response.voice"),
        speed=s.audio.output.speed,
        audio_format=fmt.model_dump(mode="json", exclude_none=True),
        metadata=cfg.metadata,
        in_conversation=cfg.conversation == "auto",
        input=items,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=(cfg.parallel_tool_calls if cfg.parallel_tool_calls is not None
                             else s.parallel_tool_calls),
        mcp_choice=choice if not isinstance(choice, str) and choice.type == "mcp" else None,
        mcp=session.mcp.offer(tools),
    )


def resolve_tool_choice(choice: Any, tools: list[Any], param: str) -> str:
    """`tool_choice` as GenerationParams takes it; a choice the tools cannot satisfy is an error."""
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise ProtocolError("tool_choice 'required' needs at least one tool in 'tools'.", param=param)
        return choice
    if choice.type == "mcp":
        if not any(isinstance(t, McpTool) and t.server_label == choice.server_label for t in tools):
            raise ProtocolError(f"tool_choice names the MCP server '{choice.server_label}', which is not among "
                                "the tools.", param=param)
        return "required"  # settled once the server's tools are listed (ResponseRun._prepare_mcp)
    if not any(isinstance(t, FunctionTool) and t.name == choice.name for t in tools):
        raise ProtocolError(f"tool_choice names the function '{choice.name}', which is not among the tools.",
                            param=param)
    return choice.name


def prompt_messages(instructions: str, items: Sequence[Item]) -> list[ChatMessage]:
    """The chat a response's model reads: its instructions, then the conversation items. The
    speculative prefill (engine/prefill.py) builds its prompt here too, so the two match token for token."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    return messages + items_to_messages(list(items))


def generation_params(spec: ResolvedResponse, cache_key: str | None) -> GenerationParams:
    """What a response asks of its LLM. The speculative prefill asks the same with ``max_tokens=0``,
    so that its prompt (tools and all) is the one the response will render."""
    cap = spec.max_output_tokens
    return GenerationParams(temperature=spec.temperature, max_tokens=None if cap == "inf" else int(cap),
                            tools=spec.tool_specs(),
                            tool_choice=spec.tool_choice, parallel_tool_calls=spec.parallel_tool_calls,
                            cache_key=cache_key)


def tool_specs(tools: list[Any]) -> list[ToolSpec]:
    """The session's function tools as the LLM backends take them (MCP tools: ResolvedResponse.mcp)."""
    return [ToolSpec(name=t.name, description=t.description, parameters=t.parameters)
            for t in tools if isinstance(t, FunctionTool)]


def items_to_messages(items: list[Item]) -> list[ChatMessage]:
    """How conversation items read to a chat model (chat-completions shape).

    A run of function_call items becomes one assistant turn with several `tool_calls` (joined to
    the assistant text right before them: the model wrote both in one turn); each
    function_call_output becomes a `tool` turn answering its call.
    """
    out: list[ChatMessage] = []
    approvals = approval_outcomes(items)

    def call(call_id: str, name: str, arguments: str, result: str) -> None:
        tool_call = ToolCall(id=call_id, name=name, arguments=arguments)
        last = out[-1] if out else None
        if last is not None and last.role == "assistant":
            last.tool_calls = [*(last.tool_calls or []), tool_call]
        else:
            out.append(ChatMessage(role="assistant", content="", tool_calls=[tool_call]))
        out.append(ChatMessage(role="tool", content=result, tool_call_id=call_id))

    for item in items:
        if item.type == "mcp_call":  # the server ran it: the call and its result (or error)
            error = (item.error or {}).get("message")
            call(item.id or "", item.name or "", item.arguments or "",
                 (item.output or "") if error is None else f"Error: {error}")
            continue
        if item.type == "mcp_approval_request":
            if approvals.get(item.id or "") is False:  # approved ones appear as their mcp_call
                call(item.id or "", item.name or "", item.arguments or "",
                     "The user declined to run this tool.")
            continue
        if item.type in ("mcp_list_tools", "mcp_approval_response"):
            continue
        if item.type == "message":
            text = item.text_for_model()
            # Images reach the prompt only for vision backends: resolve() refuses them for the rest.
            images = [ImageInput(url=p.image_url, detail=p.detail or "auto")
                      for p in item.content or [] if p.type == "input_image" and p.image_url]
            if text or images:
                out.append(ChatMessage(role=item.role, content=text,  # type: ignore[arg-type]
                                       images=images or None))
        elif item.type == "function_call":
            call = ToolCall(id=item.call_id or "", name=item.name or "", arguments=item.arguments or "")
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        else:
            out.append(ChatMessage(role="tool", content=item.output or "", tool_call_id=item.call_id))
    return out


class ResponseRun:
    """Runs in its own task; cancelling the task cancels the response cleanly.

    Output items open lazily: the assistant message (with its text or audio part) when there is
    text to show or speak, a function_call item when the model starts a call. A response that only
    calls functions therefore has no message and, in voice mode, no audio. A response that ends
    with no output at all still gets an (empty) message, as before tools existed.
    """

    def __init__(self, session: RealtimeSession, spec: ResolvedResponse):
        self.session = session
        self.spec = spec
        self.id = new_id("resp")
        self.status: Status = "in_progress"
        self.status_details: dict[str, Any] | None = None
        self.output: list[Item] = []
        self.usage: Usage | None = None
        self.cancel_reason: str = "client_cancelled"
        self.task: asyncio.Task[None] | None = None
        self._created = False  # response.created sent
        self._ended = False  # response.done sent
        # Asked before `response.created` when rate limits live in a shared store (session.py).
        self.admit: Callable[[], Awaitable[bool]] | None = None
        # Snapshot of the context now: items the client adds later belong to the next turn.
        self._source = spec.input if spec.input is not None else list(session.conversation)
        # Output items go into the conversation right after the snapshot, whatever is added meanwhile.
        self._anchor: str | None = self._source[-1].id if spec.input is None and self._source else None
        self.messages: list[ChatMessage] = []  # built once the transcripts of the source exist
        self.dropped: list[str] = []  # items truncation left out of this prompt
        self._text: list[str] = []
        self._deltas = 0
        self._message: Item | None = None
        self._calls: dict[int, Item] = {}  # function_call items by the backend's call index
        self._mcp_calls: dict[int, Item] = {}  # this generation's mcp_call / mcp_approval_request items
        self._mcp_servers: dict[str, McpTool] = {}  # their servers, by item id
        self._args: dict[int, list[str]] = {}
        self._closed: set[str] = set()  # ids of output items already done
        self.audio = SpokenAudio()
        self._joins_next = False  # the last clause spoken was cut mid-sentence
        tts_rate = session.ctx.tts.sample_rate if session.ctx.tts else OUTPUT_RATE
        self._resampler = StreamResampler(tts_rate, OUTPUT_RATE)
        self._g711_resampler = StreamResampler(OUTPUT_RATE, 8000)
        self.first_audio_at = 0.0
        # Stage marks (monotonic seconds) for the latency waterfall; the turn's own marks first.
        self.marks: dict[str, float] = {**session.turn_marks, "response_created": time.monotonic()}
        session.turn_marks = {}

    # ------------------------------------------------------------------ state

    @property
    def done(self) -> bool:
        return self.status != "in_progress"

    def snapshot(self) -> dict[str, Any]:
        usage = None
        if self.usage is not None:
            u = self.usage
            # Text tokens are the LLM's (prompt and reply, tool calls included). Speech goes through
            # separate STT and TTS models, so there are no audio tokens to report.
            usage = {
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "input_tokens": u.prompt_tokens,
                "output_tokens": u.completion_tokens,
                "input_token_details": {
                    "text_tokens": u.prompt_tokens, "audio_tokens": 0, "image_tokens": 0,
                    "cached_tokens": u.cached_tokens,
                    "cached_tokens_details": {"text_tokens": u.cached_tokens, "audio_tokens": 0,
                                              "image_tokens": 0},
                },
                "output_token_details": {"text_tokens": u.completion_tokens, "audio_tokens": 0},
            }
        return {
            "object": "realtime.response",
            "id": self.id,
            "status": self.status,
            "status_details": self.status_details,
            "output": [item.wire() for item in self.output],
            "conversation_id": self.session.conversation.id if self.spec.in_conversation else None,
            "output_modalities": self.spec.output_modalities,
            "max_output_tokens": self.spec.max_output_tokens,
            "audio": {"output": {"format": self.spec.audio_format, "voice": self.spec.voice}},
            "usage": usage,
            "metadata": self.spec.metadata,
        }

    def _messages(self, items: Sequence[Item]) -> list[ChatMessage]:
        return prompt_messages(self.spec.instructions, items)

    def _tools(self) -> list[ToolSpec]:
        return self.spec.tool_specs()

    async def _prompt(self, llm: LLMBackend) -> list[ChatMessage]:
        """The prompt messages, truncated to fit the model's context (see engine/truncation.py)."""
        context_length = int(getattr(llm, "context_length", 0) or 0)
        if context_length <= 0:
            return self._messages([*self._source, *self.output])
        window = self.session.context_window
        tools = self._tools() if self.spec.tool_choice != "none" else []
        fitted = await window.fit(
            [*self._source, *self.output], build=self._messages,
            count=functools.partial(llm.count_tokens, tools=tools or None),
            context_length=context_length,
            reserve=reply_reserve(self.spec.max_output_tokens, context_length),
            truncation=self.session.config.truncation,
            persist=self.spec.in_conversation and self.spec.input is None,
        )
        if fitted.dropped:
            log.info("response %s: truncation left out %d item(s) to fit the context of %d tokens "
                     "(prompt now %d tokens)", self.id, len(fitted.dropped), context_length, fitted.prompt_tokens)
        self.dropped = fitted.dropped
        return fitted.messages

    # ------------------------------------------------------------------ run

    @property
    def speaks(self) -> bool:
        return "audio" in self.spec.output_modalities

    def start(self) -> asyncio.Task[None]:
        """Run the response in its own task; whatever happens to the task, the response ends.

        A task cancelled before its first step never enters `run()` (a `response.cancel` or a
        barge-in right after `response.create`), so a done-callback finishes such a response:
        `response.created` and `response.done` (cancelled) are still sent and the slot is freed.
        """
        self.task = asyncio.create_task(self.run(), name=f"response-{self.id}")
        self.task.add_done_callback(self._task_done)
        return self.task

    def cancel(self, reason: str) -> None:
        if not self.done:
            self.cancel_reason = reason
        if self.task is not None:
            self.task.cancel()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._ended:
            return
        self.status = "cancelled"
        self.status_details = {"type": "cancelled", "reason": self.cancel_reason}
        self.usage = Usage(completion_tokens=self._deltas)
        self._end()

    def _end(self) -> None:
        """The closing events, exactly once: items done, `response.done`, the slot freed."""
        self._ended = True
        emit = self.session.emit
        try:
            if not self._created:
                self._created = True
                emit(ev.ResponseCreated(response={**self.snapshot(), "status": "in_progress",
                                                  "status_details": None, "usage": None}))
            if not self.output and self.status in ("completed", "incomplete"):
                self._ensure_message()
            for item in list(self.output):
                self._close(item)
        except Exception:  # a bug here must still end the response and free the slot
            log.exception("response %s: closing its items failed", self.id)
        finally:
            emit(ev.ResponseDone(response=self.snapshot()))
            self.session.ctx.stats.response_done(self.status)
            self.session.response_finished(self)

    async def run(self) -> None:
        emit = self.session.emit
        if self.admit is not None and not await self.admit():
            self._ended = True  # refused (shared rate limit): never created, so no response.done either
            self.session.response_refused(self)
            return
        self._created = True
        emit(ev.ResponseCreated(response=self.snapshot()))
        finished: Finished | None = None
        try:
            stt_done = await self.session.transcriber.wait_for([i.id for i in self._source if i.id])
            if stt_done is not None:
                self.marks["stt_done"] = stt_done
            self.marks["prompt_ready"] = time.monotonic()
            llm = await self.session.ctx.resolve_llm(self.session.config.model)
            if not await self._prepare_mcp():
                return
            resumed = await self._resume_approvals()
            self.messages = await self._prompt(llm)
            # The session's cache slot serves its conversation; an out-of-band prompt (a custom
            # `input`, conversation "none") must not overwrite it.
            params = generation_params(
                self.spec, self.session.id if self.spec.in_conversation and self.spec.input is None else None)
            rounds = 0
            while True:
                if resumed and params.tool_choice != "none":  # a forced call was made: the model answers
                    params = dataclasses.replace(params, tool_choice="auto" if rounds < MAX_MCP_ROUNDS else "none")
                if self.speaks:
                    finished = await self._stream_speech(llm, params)
                else:
                    finished = await self._stream_text(llm, params)
                self._add_usage(finished)
                if finished is not None and finished.finish_reason == "length":
                    self._abandon_mcp_calls()
                    break
                # MCP calls run here; the response goes on with their results (unless a call needs an
                # approval first, or the model also called functions the client must answer).
                ran, asked = await self._finish_mcp_calls()
                if not ran or asked or self._calls:
                    break
                rounds += 1
                resumed = True
                self.messages = await self._prompt(llm)
            if finished is not None and finished.finish_reason == "length":
                self.status = "incomplete"
                self.status_details = {"type": "incomplete", "reason": "max_output_tokens"}
            else:
                self.status = "completed"
        except asyncio.CancelledError:
            self.status = "cancelled"
            self.status_details = {"type": "cancelled", "reason": self.cancel_reason}
            self.usage = Usage(completion_tokens=self._deltas)
        except ContextOverflow as exc:
            log.warning("response %s failed: %s", self.id, exc.message)
            self._fail("context_length_exceeded", exc.message, "invalid_request_error")
        except (LLMError, TTSError) as exc:
            log.warning("response %s failed: %s", self.id, exc)
            self._fail(exc.code, str(exc), "server_error")
        except Exception as exc:  # a backend bug must not kill the session
            log.exception("response %s failed", self.id)
            self._fail("server_error", f"The model backend failed: {exc}", "server_error")
        finally:
            self._end()

    def _add_usage(self, finished: Finished | None) -> None:
        """Usage over every generation of the response (one more per MCP round)."""
        usage = finished.usage if finished else Usage(completion_tokens=self._deltas)
        if self.usage is None or usage is None:
            self.usage = usage if self.usage is None else self.usage
            return
        self.usage = dataclasses.replace(
            usage, prompt_tokens=self.usage.prompt_tokens + usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens + usage.completion_tokens,
            cached_tokens=self.usage.cached_tokens + usage.cached_tokens)

    # ------------------------------------------------------------------ MCP

    async def _prepare_mcp(self) -> bool:
        """List the servers this response needs and settle an "mcp" tool_choice; False: it failed."""
        if not mcp_tools(self.spec.tools):
            return True
        registry = self.session.mcp
        await registry.ready(self.spec.tools)
        choice = self.spec.mcp_choice
        try:
            if choice is not None:
                self.spec.mcp, self.spec.tool_choice = registry.choose(self.spec.tools, choice.server_label,
                                                                       choice.name)
                self.spec.mcp_only = choice.name is None
            else:
                self.spec.mcp = registry.offer(self.spec.tools)
        except McpCallError as exc:
            self._fail("invalid_tool_choice", exc.message, "invalid_request_error")
            return False
        if self.spec.tool_choice == "required" and not self._tools():
            self._fail("invalid_tool_choice", "tool_choice 'required' but no tool is available: the MCP servers "
                       "listed none.", "invalid_request_error")
            return False
        return True

    async def _resume_approvals(self) -> bool:
        """Act on the client's answers to earlier approval requests: run the approved calls first.

        True when there was an answer to act on (the model then answers instead of calling again).
        """
        if not self.spec.in_conversation:  # out of band: the conversation's own response acts on them
            return False
        outcomes = approval_outcomes(self._source)
        registry = self.session.mcp
        acted = False
        for request in [it for it in self._source if it.type == "mcp_approval_request"]:
            rid = request.id or ""
            if rid not in outcomes or rid in registry.answered:
                continue
            registry.answered.add(rid)
            acted = True
            if not outcomes[rid]:
                continue  # declined: the prompt says so (items_to_messages)
            item = Item(id=new_id("mcp"), type="mcp_call", server_label=request.server_label, name=request.name,
                        arguments="", approval_request_id=rid)
            self._add_item(item)
            index = self.output.index(item)
            item.arguments = request.arguments or ""
            if item.arguments:
                self.session.emit(ev.ResponseMcpCallArgumentsDelta(
                    response_id=self.id, item_id=item.id or "", output_index=index, delta=item.arguments))
            self.session.emit(ev.ResponseMcpCallArgumentsDone(
                response_id=self.id, item_id=item.id or "", output_index=index, arguments=item.arguments))
            server = next((t for t in mcp_tools(self.spec.tools) if t.server_label == request.server_label), None)
            await self._call_mcp(item, server)
        return acted

    async def _finish_mcp_calls(self) -> tuple[int, int]:
        """After a generation: run its MCP calls, close its approval requests. (calls run, approvals asked)"""
        ran = asked = 0
        calls, self._mcp_calls = self._mcp_calls, {}
        for index, item in calls.items():
            item.arguments = "".join(self._args.pop(index, []))
            if item.type == "mcp_approval_request":
                self._close(item, completed=True)
                asked += 1
                continue
            self.session.emit(ev.ResponseMcpCallArgumentsDone(
                response_id=self.id, item_id=item.id or "", output_index=self.output.index(item),
                arguments=item.arguments))
            await self._call_mcp(item, self._mcp_servers.get(item.id or ""))
            ran += 1
        return ran, asked

    def _abandon_mcp_calls(self) -> None:
        """Calls the output cap cut short are not run: they end `.failed`, saying why."""
        calls, self._mcp_calls = self._mcp_calls, {}
        for index, item in calls.items():
            item.arguments = "".join(self._args.pop(index, []))
            if item.type == "mcp_call":
                output_index = self.output.index(item)
                self.session.emit(ev.ResponseMcpCallArgumentsDone(
                    response_id=self.id, item_id=item.id or "", output_index=output_index,
                    arguments=item.arguments))
                item.error = McpCallError("tool_execution_error", "Not run: the response reached max_output_tokens "
                                                                  "before the call's arguments were complete.").wire()
                self.session.emit(ev.ResponseMcpCallFailed(item_id=item.id or "", output_index=output_index))
            self._close(item, completed=False)

    async def _call_mcp(self, item: Item, server: McpTool | None) -> None:
        """Run one call on its server: `.in_progress`, then `.completed` (output) or `.failed` (error)."""
        emit = self.session.emit
        index = self.output.index(item)
        emit(ev.ResponseMcpCallInProgress(item_id=item.id or "", output_index=index))
        client = self.session.ctx.mcp
        try:
            if server is None or client is None:
                raise McpCallError("protocol_error", f"The MCP server '{item.server_label}' is not among this "
                                                     "response's tools.")
            try:
                arguments = json.loads(item.arguments or "{}")
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise McpCallError("tool_execution_error", "The tool's arguments are not a JSON object.")
            item.output = await client.call_tool(server.server_url or "", request_headers(server), item.name or "",
                                                 arguments, self.session.ctx.mcp_timeout_s)
        except McpCallError as exc:
            item.error = exc.wire()
        except Exception as exc:  # a client bug: the call fails, the response goes on
            log.exception("response %s: MCP call %s failed", self.id, item.name)
            item.error = McpCallError("protocol_error", f"The MCP call failed: {exc}").wire()
        if item.error is not None:
            log.info("response %s: MCP call %s/%s failed: %s", self.id, item.server_label, item.name,
                     item.error.get("message"))
            emit(ev.ResponseMcpCallFailed(item_id=item.id or "", output_index=index))
        else:
            emit(ev.ResponseMcpCallCompleted(item_id=item.id or "", output_index=index))
        self._close(item, completed=True)

    async def _open_stream(self, llm: LLMBackend, params: GenerationParams) -> AsyncIterator[LLMEvent]:
        """The LLM's events for this prompt: the turn's speculative generation when it was asked
        for exactly this (engine/prefill.py), else a request of our own, once the speculation has
        left the conversation's cache slot (what it evaluated stays cached)."""
        prefill = self.session.prefill
        adopted = prefill.adopt(self.messages, params)
        if adopted is not None:
            self.marks["speculative_llm"] = 1.0
            return adopted
        await prefill.settle()
        return llm.stream(self.messages, params)

    async def _stream_text(self, llm: LLMBackend, params: GenerationParams) -> Finished | None:
        finished = None
        async with contextlib.aclosing(await self._open_stream(llm, params)) as stream:
            async for chunk in stream:
                if isinstance(chunk, TextDelta):
                    self.marks.setdefault("llm_first_token", time.monotonic())
                    if chunk.text:
                        self._deltas += 1
                        self._text.append(chunk.text)
                        item = self._ensure_message()
                        self.session.emit(ev.ResponseOutputTextDelta(**self._part_ids(item), delta=chunk.text))
                elif isinstance(chunk, ToolCallDelta):
                    self.marks.setdefault("llm_first_token", time.monotonic())
                    if self._message is not None:
                        self._close(self._message)  # the text before a call is complete
                    self._on_tool_delta(chunk)
                elif isinstance(chunk, Finished):
                    finished = chunk
        return finished

    async def _stream_speech(self, llm: LLMBackend, params: GenerationParams) -> Finished | None:
        """LLM and TTS run concurrently: each clause is spoken while the next is generated.

        The message item opens when the first clause is queued (not when it is spoken), so output
        indices follow the order in which the model wrote text and calls.
        """
        clauses: asyncio.Queue[str | None] = asyncio.Queue()
        result: list[Finished] = []

        def queue(clause: str) -> None:
            self._ensure_message()
            clauses.put_nowait(clause)

        async def produce() -> None:
            splitter = ClauseSplitter(first_words=self.session.ctx.first_chunk_words)
            try:
                async with contextlib.aclosing(await self._open_stream(llm, params)) as stream:
                    async for chunk in stream:
                        if isinstance(chunk, TextDelta):
                            self.marks.setdefault("llm_first_token", time.monotonic())
                            self._deltas += 1
                            for clause in splitter.push(chunk.text):
                                queue(clause)
                        elif isinstance(chunk, ToolCallDelta):
                            self.marks.setdefault("llm_first_token", time.monotonic())
                            tail = splitter.flush()
                            if tail.strip():
                                queue(tail)
                            self._on_tool_delta(chunk)
                        elif isinstance(chunk, Finished):
                            result.append(chunk)
                tail = splitter.flush()
                if tail.strip():
                    queue(tail)
            finally:
                clauses.put_nowait(None)

        producer = asyncio.create_task(produce(), name=f"llm-{self.id}")
        try:
            while (clause := await clauses.get()) is not None:
                await self._speak(self._ensure_message(), clause)
            if self._message is not None:
                self._play(self._message, self._resampler.flush(), final=True)
            await producer  # re-raises a backend failure
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producer
        return result[0] if result else None

    async def _speak(self, item: Item, clause: str) -> None:
        """Synthesize one clause and play it, without the TTS's silence where it only delays or gaps
        the reply (audio/quiet.py): before the first word, and around a cut mid-sentence."""
        tts = self.session.ctx.tts
        assert tts is not None
        start = self.audio.ms
        self._text.append(clause)
        self.session.emit(ev.ResponseOutputAudioTranscriptDelta(**self._part_ids(item), delta=clause))
        self.marks.setdefault("first_clause", time.monotonic())
        trim = self.session.ctx.trim_tts_silence
        lead = LeadTrimmer(tts.sample_rate) if trim and (not self.audio.clauses or self._joins_next) else None
        # A clause cut mid-sentence (`tts_first_words`) ends on at most TAIL_KEEP_MS of silence:
        # each chunk's trailing quiet is held back until more sound follows it.
        self._joins_next = trim and not _PAUSE_AFTER.search(clause)
        quiet = b""
        async with contextlib.aclosing(
                tts.synthesize(speakable(clause), voice=self.spec.voice, speed=self.spec.speed)) as chunks:
            async for chunk in chunks:
                if lead is not None:
                    chunk = lead.process(chunk)
                if self._joins_next:
                    body, after = split_tail(chunk)
                    chunk, quiet = (quiet + body, after) if body else (b"", quiet + after)
                self._play(item, self._resampler.process(chunk))
        if quiet:
            self._play(item, self._resampler.process(quiet[:tail_keep_bytes(tts.sample_rate)]))
        self.audio.clauses.append((start, self.audio.ms, clause))

    def _play(self, item: Item, pcm24: bytes, final: bool = False) -> None:
        """Send synthesized audio on: to the player (WebRTC) or as delta events (WebSocket).

        `final` flushes the resamplers' filter delay at the end of the response.
        """
        if not pcm24 and not final:
            return
        if pcm24 and not self.first_audio_at:
            self.first_audio_at = self.marks["tts_first_chunk"] = time.monotonic()
        self.audio.pcm.extend(pcm24)
        output = self.session.audio_output
        if output is not None:
            if pcm24:
                output.play(self.id, item.id or "", pcm24)
            return
        fmt = self.spec.audio_format.get("type", "audio/pcm")
        data = pcm24
        if fmt != "audio/pcm":
            data = encode_from_pcm16(self._g711_resampler.process(pcm24, last=final), fmt)
        step = (DELTA_MS * (OUTPUT_RATE if fmt == "audio/pcm" else 8000) // 1000) * (2 if fmt == "audio/pcm" else 1)
        for i in range(0, len(data), step):
            self.session.emit(ev.ResponseOutputAudioDelta(
                **self._part_ids(item), delta=base64.b64encode(data[i:i + step]).decode()))

    def _fail(self, code: str, message: str, type: str) -> None:
        self.status = "failed"
        self.status_details = {"type": "failed", "error": {"type": type, "code": code, "message": message}}

    # ------------------------------------------------------------------ output items

    def _part_ids(self, item: Item) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": item.id, "output_index": self.output.index(item),
                "content_index": 0}

    def _add_item(self, item: Item) -> None:
        """Append an output item: `response.output_item.added`, then into the conversation."""
        self.output.append(item)
        emit = self.session.emit
        emit(ev.ResponseOutputItemAdded(response_id=self.id, output_index=len(self.output) - 1,
                                        item=item.wire()))
        if self.spec.in_conversation:
            conversation = self.session.conversation
            after = self._anchor if self._anchor is not None else "root"
            if after != "root" and conversation.get(after) is None:
                after = None  # the item we followed was deleted meanwhile: append at the end
            previous = conversation.insert(item, after)
            self._anchor = item.id
            emit(ev.ConversationItemAdded(previous_item_id=previous, item=item.wire()))

    def _ensure_message(self) -> Item:
        """The assistant message of this response, opened (with its content part) on first use.

        Text after a function call (a remote model may write some) opens a new message.
        """
        if self._message is not None and self._message.id not in self._closed:
            return self._message
        if self._message is not None:
            self._text = []
        item = Item(id=new_id("item"), type="message", role="assistant", status="in_progress", content=[])
        self._message = item
        self._add_item(item)
        if self.speaks:
            self.session.spoken[item.id or ""] = self.audio
            item.content = [ContentPart(type="output_audio", transcript="")]
            part = {"type": "audio", "transcript": ""}
        else:
            item.content = [ContentPart(type="output_text", text="")]
            part = {"type": "text", "text": ""}
        self.session.emit(ev.ResponseContentPartAdded(**self._part_ids(item), part=part))
        return item

    def _on_tool_delta(self, delta: ToolCallDelta) -> None:
        item = self._calls.get(delta.index) or self._mcp_calls.get(delta.index)
        if item is None:
            for other in self._calls.values():  # a new call starts: the previous one is complete
                self._close(other, completed=True)
            target = self.spec.mcp.names.get(delta.name or "")
            if target is not None:  # the server runs it (or asks the client's approval first)
                server, tool = target
                kind = "mcp_approval_request" if server.needs_approval(tool.name, tool.annotations) else "mcp_call"
                item = Item(id=new_id("mcp"), type=kind, server_label=server.server_label, name=tool.name,
                            arguments="")
                self._mcp_calls[delta.index] = item
                self._mcp_servers[item.id or ""] = server
            else:
                item = Item(id=new_id("item"), type="function_call", status="in_progress",
                            call_id=delta.call_id or new_id("call"), name=delta.name or "", arguments="")
                self._calls[delta.index] = item
            self._args[delta.index] = []
            self._add_item(item)
        elif delta.name and not item.name:
            item.name = delta.name
        if delta.arguments and item.id not in self._closed:
            self._args[delta.index].append(delta.arguments)
            if item.type == "function_call":
                self.session.emit(ev.ResponseFunctionCallArgumentsDelta(
                    response_id=self.id, item_id=item.id or "", output_index=self.output.index(item),
                    call_id=item.call_id or "", delta=delta.arguments))
            elif item.type == "mcp_call":
                self.session.emit(ev.ResponseMcpCallArgumentsDelta(
                    response_id=self.id, item_id=item.id or "", output_index=self.output.index(item),
                    delta=delta.arguments))

    def _close(self, item: Item, completed: bool | None = None) -> None:
        """Finish an output item once: its done events, then `conversation.item.done`."""
        if item.id in self._closed:
            return
        self._closed.add(item.id or "")
        emit = self.session.emit
        index = self.output.index(item)
        if completed is None:
            completed = self.status == "completed" or (self.status == "in_progress" and item.type == "message")
        if item.type.startswith("mcp_"):
            pass  # its events were sent as the call ran (_call_mcp); a cancelled call ends as it is
        elif item.type == "function_call":
            call_index = next(k for k, v in self._calls.items() if v is item)
            item.arguments = "".join(self._args[call_index])
            emit(ev.ResponseFunctionCallArgumentsDone(
                response_id=self.id, item_id=item.id or "", output_index=index, call_id=item.call_id or "",
                name=item.name or "", arguments=item.arguments))
        else:
            ids = self._part_ids(item)
            text = "".join(self._text)
            if self.speaks:
                item.content = [ContentPart(type="output_audio", transcript=text)]
                emit(ev.ResponseOutputAudioDone(**ids))
                emit(ev.ResponseOutputAudioTranscriptDone(**ids, transcript=text))
                emit(ev.ResponseContentPartDone(**ids, part={"type": "audio", "transcript": text}))
            else:
                item.content = [ContentPart(type="output_text", text=text)]
                emit(ev.ResponseOutputTextDone(**ids, text=text))
                emit(ev.ResponseContentPartDone(**ids, part={"type": "text", "text": text}))
        item.status = "completed" if completed else "incomplete"
        emit(ev.ResponseOutputItemDone(response_id=self.id, output_index=index, item=item.wire()))
        if self.spec.in_conversation and self.session.conversation.get(item.id or "") is item:
            emit(ev.ConversationItemDone(previous_item_id=self.session.conversation.previous_id(item.id or ""),
                                         item=item.wire()))
