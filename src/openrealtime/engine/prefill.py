"""Speculative prompt evaluation: the LLM reads the next prompt while the silence wait decides the turn.

The transcript of a turn that may be over is computed at the first pause (speculative STT, see
engine/input.py). As soon as it is there, the prompt the turn's response would get (the session's
instructions and tools, the conversation, the new user message) is evaluated with
``max_tokens=0`` into the session's cache slot (``cache_key``): nothing is generated or sent.
When the turn is confirmed, the response's own request finds that prompt cached and starts
generating at once; when the user goes on speaking, the work is only cache that the next prompt
diverges from (it is cut back there), so nothing stale can reach the client.

With ``llm_speculate`` (the default) the request does not stop at the prompt: it goes on
generating the reply into a buffer that nothing reads. When the turn is confirmed, the response
adopts it if its own prompt and sampling are exactly the speculation's (`adopt`): it replays what
was written and follows the rest, so the first words are there the moment the turn ends. Any
difference (another transcript, a client's own response.create, MCP tools) and the speculation is
cancelled and the response asks for itself. The waste is bounded by the pause: the user speaking
again cancels it (engine/input.py).

The turn's first tokens go in even sooner: when the user starts speaking, the prompt up to the
start of their message (the end of the reply before, the template's user header; on a first turn,
the instructions and tools too) is evaluated as an open prompt (``open_last``), and while they go on
speaking, the words so far (a partial transcript every ``prefill_words_ms`` of speech,
engine/transcription.py), so at the end of the turn only the last words and the assistant's header
are left. This runs while the user speaks, when the LLM is idle, so it pays for semantic_vad as
well; words that the final transcript does not repeat are only cache it is cut back from.

Only backends that keep a cache per conversation (``prefills = True``: the in-process llama.cpp
backend) are asked; a remote provider would bill a request for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..backends.llm import ChatMessage, Finished, GenerationParams, LLMError, LLMEvent
from ..protocol.items import ContentPart, Item
from .mcp import mcp_tools
from .response import generation_params, prompt_messages, resolve

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)


def prefill_wanted(setting: bool | str, *, semantic: bool) -> bool:
    """Whether a pause's prompt is evaluated: `llm_prefill` True/False, or "auto" (server_vad only).

    With semantic_vad the end-of-turn model decides some 100-150 ms after the pause begins, about
    when the speculative transcript is ready, so a prefill has nothing left to overlap and its work
    on both cores delays the decision itself (measured: heard 1843 -> 2027 ms over WebRTC).
    """
    if setting == "auto":
        return not semantic
    return bool(setting)


_END = object()  # the speculative request is over (after its Finished, its error, or neither)


@dataclasses.dataclass(eq=False)
class _Generation:
    """A speculative request's prompt and sampling, and the events it has produced so far."""

    messages: list[ChatMessage]
    params: GenerationParams
    events: asyncio.Queue[object] = dataclasses.field(default_factory=asyncio.Queue)
    failed: bool = False


class SpeculativePrefill:
    """At most one prefill per session: the one for the pause the user is in now."""

    def __init__(self, session: RealtimeSession) -> None:
        self.s = session
        self._task: asyncio.Task[None] | None = None
        self._evaluating = False  # the prefill's LLM request is under way
        self._generation: _Generation | None = None  # what it writes, for the response to adopt
        self._open = False  # the task is `start_turn`'s
        self._prefills: tuple[str | None, bool] | None = None  # (model, its backend prefills), once known

    def start(self, transcript: asyncio.Task, *, semantic: bool = False) -> None:
        """Prefill once the speculative transcript `transcript` (a Transcriber task) is ready;
        `semantic`: the turn is decided by semantic_vad (see `prefill_wanted`)."""
        if not prefill_wanted(self.s.ctx.speculative_prefill, semantic=semantic):
            if not self._open:  # an open prefill is never stale: it reads only what precedes the turn
                self.cancel()
            return
        self.cancel()
        self._evaluating = False
        self._task = asyncio.create_task(self._run(transcript), name=f"prefill-{self.s.id}")

    def wants_words(self) -> bool:
        """Whether `start_turn` would evaluate anything now (the partial transcripts it reads cost
        a decode each: not for nothing)."""
        s = self.s
        if not s.ctx.speculative_prefill or s.transcription_only or s.responding or s.closed:
            return False
        known = self._prefills
        if known is not None and known[0] == s.config.model and not known[1]:
            return False  # a remote model: nothing to prefill
        td = s.config.audio.input.turn_detection
        return td is not None and td.create_response  # else the client decides when (and whether) to answer

    def start_turn(self, words: str = "") -> None:
        """The user is speaking (`words`: what they said so far, if known): evaluate the prompt up
        to there (see the module doc). Not while a response holds the session's cache slot, nor
        with `llm_prefill` off."""
        if not self.wants_words():
            return
        self.cancel()
        self._evaluating, self._open = False, True
        self._task = asyncio.create_task(self._run_open(words), name=f"prefill-open-{self.s.id}")

    def turn_committed(self) -> None:
        """The turn is confirmed: a prefill still waiting for its transcript would only start when
        the response does (the transcript was the bottleneck) and delay it, so it is dropped; one
        already evaluating goes on (the response then finds its prompt cached)."""
        if not self._evaluating:
            self.cancel()

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop the prefill (the user went on, or a response starts); returns its task to await."""
        task, self._task = self._task, None
        self._generation, self._open = None, False
        if task is not None and not task.done():
            task.cancel()
        return task

    async def settle(self) -> None:
        """Before a response's own LLM request: the prefill leaves its slot (what it evaluated stays)."""
        task = self.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def adopt(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator[LLMEvent] | None:
        """The speculative generation as the response's own stream, if it was asked for exactly
        this prompt and sampling (and has not failed); None otherwise (call `settle` then)."""
        gen, task = self._generation, self._task
        if gen is None or task is None or gen.failed or gen.messages != messages or gen.params != params:
            return None
        self._task, self._generation = None, None  # the response owns it now
        return _relay(task, gen.events)

    async def _run_open(self, words: str) -> None:
        """The open prompt of `start_turn`: the conversation, then the user message so far."""
        s = self.s
        try:
            model = s.config.model
            llm = await s.ctx.resolve_llm(model)
            self._prefills = (model, bool(getattr(llm, "prefills", False)))
            if not self._prefills[1]:
                return
            spec = resolve(s, None)
            if not spec.in_conversation:
                return
            messages = [*prompt_messages(spec.instructions, list(s.conversation)),
                        ChatMessage(role="user", content=words)]
            params = dataclasses.replace(generation_params(spec, s.id), max_tokens=0, open_last=True)
            self._evaluating = True
            s.ctx.stats.prefills["open"] += 1
            async with contextlib.aclosing(llm.stream(messages, params)) as stream:
                async for _ in stream:
                    pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a hint only, as in _run
            log.debug("session %s: open prefill skipped: %s", self.s.id, exc)

    async def _run(self, transcript: asyncio.Task) -> None:
        gen: _Generation | None = None  # local: once adopted, self._generation is no longer it
        try:
            result = await asyncio.shield(transcript)  # cancelling the prefill leaves the STT running
            text = result.done.text.strip()
            if not text:
                return
            s = self.s
            llm = await s.ctx.resolve_llm(s.config.model)
            if not getattr(llm, "prefills", False):
                return
            spec = resolve(s, None)
            user = Item(type="message", role="user", status="completed",
                        content=[ContentPart(type="input_audio", transcript=text)])
            messages = prompt_messages(spec.instructions, [*s.conversation, user])
            params = generation_params(spec, s.id)
            td = s.config.audio.input.turn_detection
            # Only a turn that answers itself has a response coming to adopt the reply; otherwise
            # (create_response false: the client decides) it could run to its token cap for nothing.
            answers = td is not None and td.create_response and not s.transcription_only
            if s.ctx.speculative_generation and answers and spec.in_conversation and not mcp_tools(spec.tools):
                gen = self._generation = _Generation(messages, params)
            else:
                params = dataclasses.replace(params, max_tokens=0)
            self._evaluating = True
            s.ctx.stats.prefills["pause"] += 1
            async with contextlib.aclosing(llm.stream(messages, params)) as stream:
                async for event in stream:
                    if gen is not None:
                        gen.events.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a hint only: the response does the real work and reports errors
            if gen is not None:
                gen.failed = True  # not adopted from now on
                gen.events.put_nowait(exc)  # a response that already adopted it fails with it
            log.debug("session %s: speculative prefill skipped: %s", self.s.id, exc)
        finally:
            if gen is not None:
                gen.events.put_nowait(_END)


async def _relay(task: asyncio.Task[None], events: asyncio.Queue[object]) -> AsyncIterator[LLMEvent]:
    """Replay an adopted speculation's events, then follow it; leaving early cancels it."""
    try:
        while True:
            item = await events.get()
            if item is _END:
                raise LLMError("The generation stopped before it finished")  # a backend that ends unfinished
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
            if isinstance(item, Finished):
                return
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
