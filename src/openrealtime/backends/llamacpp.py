"""In-process llama.cpp backend (ik_llama.cpp through the ``ik-llama-cpp-python`` ctypes bindings).

Concurrency model: one model and one llama context per backend instance, shared by every session
that uses that model, with **continuous batching** over llama.cpp sequences. The context holds
``n_parallel`` sequences ("slots"), each the KV cache of one conversation. Every decode step
evaluates one batch holding the next token of every generating request plus, in what is left of
the step's token budget, pieces of the prompts of new requests; requests join and leave between
steps. So aggregate tokens/s grows with the number of concurrent requests (a step over 8 sequences
costs far less than 8 steps), a new turn's prompt is evaluated in the very next step instead of
waiting behind other replies, and a long or hostile request only makes each step a little longer.

A request is given the slot of its conversation (``GenerationParams.cache_key``, the engine's
session id), else an idle slot whose tokens its prompt extends, else an empty or the least
recently used idle slot, into which the longest shared prefix of another slot (a common system
prompt) is copied first (``llama_kv_cache_seq_cp`` shares the cells). So a session's prefix stays
cached between its turns while others talk. When the cache's cells run out, idle slots are evicted
least recently used first; a request that still cannot fit fails with ``server_overloaded``. More
concurrent requests than slots wait in FIFO order for one to free.

All llama.cpp work of the process (loading, decode steps, freeing) runs on a single compute
thread, which serves the backends (models) with work in turn, one step each. Why one thread:
ggml computes with OpenMP, which keeps a thread team per calling thread. As soon as more OpenMP
threads exist than cores (two calling threads x 2 threads), libgomp stops spin-waiting between
parallel regions and decoding becomes 3-4x slower (measured on 2 cores). Steps of few tokens
(generation) use ``n_threads``, steps with many (prompts) ``n_threads_batch`` (see ``__init__``).

Each request is a generator that yields an ``_Eval`` (the tokens it wants evaluated next) and is
resumed with the logits after them; the guided tool-call decoder (``tool_calling``) composes into
it with ``yield from``. ``stream()`` never blocks the event loop: it queues a request and receives
its events through an ``asyncio.Queue`` fed with ``call_soon_threadsafe``. Leaving the stream
early (``aclose()``, task cancellation) sets a flag the scheduler checks before every step: the
request leaves the batch at once (its slot keeps what was evaluated), and one still queued never
runs.

Every token a response writes counts against its budget: ``max_tokens``, or when that is None
(``max_output_tokens: "inf"``) ``max_output_tokens`` of the backend (4096 by default, the hosted
API's limit), and never more than the context has left. That includes schema-guided tool calls
(see ``tool_calling``): a schema demanding more than the budget is cut with finish "length".

The high-level ``ik_llama_cpp.IkLlama`` is not used: it hard-codes a Gemma chat template and clears
the KV cache on every call. Only the low-level bindings are used, plus a few C functions the
bindings do not wrap (KV-cache sequence removal and copy, metadata, logging), declared here.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from openrealtime import telemetry
from openrealtime.backends import worker
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
from openrealtime.backends.tool_calling import (
    CALL_PREFIX,
    MAX_CALLS_PER_RESPONSE,
    TOOL_CALL_OPEN,
    CallScanner,
    GuidedDecoder,
    NameGuard,
    Steps,
    TokenVocab,
    answered_calls,
    call_key,
    call_probability,
    could_start_name,
    grounded,
    new_call_id,
    template_messages,
    template_supports_tools,
    with_tool_rule,
)
from openrealtime.backends.worker import busy_workers, speech_idle_s

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_native_logger = logging.getLogger(__name__ + ".native")

# Prompt tokens evaluated per llama_decode call. Cancellation is checked between calls, so this
# bounds how long a cancelled request can keep the model busy (~1 s for the 1.5B model on 2 cores).
_EVAL_CHUNK = 128
# ik_llama.cpp switches to different matrix kernels for batches of >= 32 tokens, and on some CPUs
# and quant types (seen: Q4_1 on an AVX-512 EPYC) those give wrong logits. Each model is checked at
# load time; a model that fails is evaluated in batches of this size instead.
_SAFE_EVAL_CHUNK = 16
_BATCH_CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. "
    "Pack my box with five dozen liquor jugs, then sphinx of black quartz, judge my vow."
)
# Largest logit difference accepted between batched and small-batch evaluation (normal kernel
# differences are ~0.3; broken kernels give >10).
_BATCH_CHECK_TOLERANCE = 2.0
# Output tokens of a response without max_tokens (``"inf"``): the hosted API's model limit.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
# Sequences (conversations whose KV cache is kept) per model, and the KV cells shared by all of
# them, as a multiple of the per-conversation context (~23-28 KB per cell for the bundled models).
DEFAULT_PARALLEL = 16
DEFAULT_CACHE_CONTEXTS = 4
# Decode steps with at least this many tokens use the batch thread count (see __init__).
_BATCH_THREADS_MIN_TOKENS = 32
# Marks where an open last message's text ends in its rendered prompt (private-use characters, which
# no template writes).
_CUT_MARK = "\ue000\ue001cut\ue001\ue000"
# A shared prefix (system prompt) at least this long is copied from another slot, not evaluated.
_MIN_SHARED_PREFIX = 16
# A batch generates on every core once no speech model has computed for this long (see _decode_parts).
_SPEECH_QUIET_S = 1.0

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- native bindings --------------------------------------------------------------------------------


class _Native:
    """The bindings module plus the C functions it does not wrap, bound lazily on first load.

    Fresh function pointers (``lib[name]``) are used so that setting argtypes cannot interfere
    with the package's own declarations.
    """

    _instance: _Native | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        from ik_llama_cpp import _ctypes_api as C  # loads libllama.so: keep out of module import

        self.C = C
        lib = C._lib
        vp, i32, u32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32

        def bind(name: str, argtypes: list[Any], restype: Any) -> Any:
            fn = lib[name]
            fn.argtypes = argtypes
            fn.restype = restype
            return fn

        self.log_callback_type = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        self.log_set = bind("llama_log_set", [self.log_callback_type, vp], None)
        self.kv_seq_rm = bind("llama_kv_cache_seq_rm", [vp, i32, i32, i32], ctypes.c_bool)
        self.meta_val_str = bind("llama_model_meta_val_str", [vp, ctypes.c_char_p, ctypes.c_char_p,
                                                              ctypes.c_size_t], i32)
        self.token_bos = bind("llama_token_bos", [vp], i32)
        self.token_eos = bind("llama_token_eos", [vp], i32)
        self.add_bos_token = bind("llama_add_bos_token", [vp], i32)
        self.token_get_text = bind("llama_token_get_text", [vp, i32], ctypes.c_char_p)
        self.token_is_control = bind("llama_token_is_control", [vp, i32], ctypes.c_bool)
        self.token_is_eog = bind("llama_token_is_eog", [vp, i32], ctypes.c_bool)
        self.token_to_piece = bind("llama_token_to_piece", [vp, i32, ctypes.c_char_p, i32, i32,
                                                            ctypes.c_bool], i32)
        self.tokenize = bind("llama_tokenize", [vp, ctypes.c_char_p, i32, ctypes.POINTER(i32), i32,
                                                ctypes.c_bool, ctypes.c_bool], i32)
        self.n_ctx = bind("llama_n_ctx", [vp], u32)
        self.set_n_threads = bind("llama_set_n_threads", [vp, u32, u32], None)
        self.n_batch = bind("llama_n_batch", [vp], u32)
        self.n_ctx_train = bind("llama_n_ctx_train", [vp], i32)
        self.n_vocab = bind("llama_n_vocab", [vp], i32)
        self.model_desc = bind("llama_model_desc", [vp, ctypes.c_char_p, ctypes.c_size_t], i32)
        self.kv_seq_cp = bind("llama_kv_cache_seq_cp", [vp, i32, i32, i32, i32], None)

        # Route llama.cpp's chatter (hundreds of lines per load) to logging instead of stderr.
        # The callback object must stay referenced for the life of the process.
        self._log_cb = self.log_callback_type(self._on_native_log)
        self.log_set(self._log_cb, None)
        C.llama_backend_init()

    @staticmethod
    def _on_native_log(level: int, text: bytes | None, _user: Any) -> None:
        if not text or not _native_logger.isEnabledFor(logging.DEBUG):
            return
        with contextlib.suppress(Exception):  # never let an exception cross into C
            msg = text.decode("utf-8", "replace").rstrip()
            if msg:
                _native_logger.debug("%s", msg)

    @classmethod
    def get(cls) -> _Native:
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


def _cpu_supports_flash_attn() -> bool:
    """ik_llama.cpp's CPU flash attention asserts on some prompts without VNNI (per the bindings)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx_vnni" in flags or "avx512_vnni" in flags


# --- chat template ----------------------------------------------------------------------------------


class ChatTemplate:
    """Renders the model's own Jinja chat template (from the GGUF metadata) like HF transformers."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source or CHATML_TEMPLATE
        self.is_fallback = not source
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except Exception as exc:
            raise LLMError(f"Invalid chat template in model: {exc}", code="chat_template_error") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Templates that render `tools` in the <tool_call> convention get them natively; for the
        # others, tools, calls and results are rewritten into plain turns (see tool_calling).
        self.native_tools = template_supports_tools(self.source)

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
               tools: list[ToolSpec] | None = None) -> str:
        """Render a conversation; errors become LLMError so the engine reports a failed response."""
        try:
            msgs, tool_var = template_messages(messages, tools or [], self.native_tools)
            text = self._template.render(
                messages=msgs,
                tools=tool_var,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
            return with_tool_rule(text) if tool_var else text
        except LLMError:
            raise
        except Exception as exc:
            raise LLMError(f"Chat template failed: {exc}", code="chat_template_error") from exc


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise LLMError(f"Chat template rejected the conversation: {message}", code="chat_template_error")


# --- sampling -----------------------------------------------------------------------------------------


def sample_token(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> int:
    """Pick the next token: greedy at temperature 0, else top-k -> top-p -> min-p -> temperature
    (llama.cpp's order).

    Done in numpy rather than with llama.cpp's samplers so it is reproducible with a seed and does
    not need a 150k-entry ctypes array per token.
    """
    if params.temperature <= 0:
        return int(np.argmax(logits))
    n = logits.shape[0]
    k = params.top_k if 0 < params.top_k < n else n
    idx = np.argpartition(logits, n - k)[n - k:] if k < n else np.arange(n)
    cand = logits[idx].astype(np.float64)
    order = np.argsort(-cand, kind="stable")
    idx, cand = idx[order], cand[order]
    if 0 < params.top_p < 1:
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        idx, cand = idx[:keep], cand[:keep]
    if 0 < params.min_p < 1:
        keep = max(1, int(np.count_nonzero(cand - cand[0] >= np.log(params.min_p))))  # sorted: a prefix
        idx, cand = idx[:keep], cand[:keep]
    scaled = (cand - cand[0]) / params.temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    return int(idx[rng.choice(len(idx), p=probs)])


# Under tool_choice "auto" two signals decide whether the reply is a call:
# 1. the mass the model's first logits put on starting a call in any form (tag, JSON, code fence:
#    tool_calling.call_probability) must reach CALL_FLOOR, after a tool result (the reply should
#    answer from it) CALL_THRESHOLD_AFTER_RESULT;
# 2. with the call opening then written, the model must be sure which function it calls
#    (the likeliest of tool_calling.name_probabilities >= NAME_CONFIDENCE), else the opening is taken back and the
#    reply is text.
# Neither alone separates the cases: read with `bench/tool_probe.py` over bench/tool_cases.py with
# qwen2.5-1.5b, requests needing a tool have 0.33-0.90 on (1) and 0.74-1.00 on (2); requests needing
# none 0.02-0.66 on (1) but 0.00-0.54 on (2), except where a name matches a word of the request
# ("how do you spell 'necessary'" -> lookup_order 0.84), which the grounding check may still catch;
# follow-ups after a result < 0.01 on (1). (Chosen on those same 42 cases: a new tool set may need
# its own look.)
CALL_FLOOR = 0.25
CALL_THRESHOLD_AFTER_RESULT = 0.75
NAME_CONFIDENCE = 0.7


def _masked(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The logits with `tokens` ruled out."""
    if not len(tokens):
        return logits
    out = logits.copy()
    out[tokens] = -np.inf
    return out


def _offered_tools(params: GenerationParams) -> tuple[list[ToolSpec], str | None]:
    """The tools the model sees, and the forced choice: "" = any of them, a name = that one."""
    if not params.tools or params.tool_choice == "none":
        if params.tool_choice not in ("auto", "none"):
            raise LLMError(f"tool_choice {params.tool_choice!r} needs tools, and none were given.",
                           code="invalid_tool_choice")
        return [], None
    tools = list(params.tools)
    if params.tool_choice == "auto":
        return tools, None
    if params.tool_choice == "required":
        return tools, ""
    if not any(t.name == params.tool_choice for t in tools):
        raise LLMError(f"tool_choice names the function {params.tool_choice!r}, which is not among the tools.",
                       code="invalid_tool_choice")
    return tools, params.tool_choice


# --- requests -----------------------------------------------------------------------------------------


class _Stop(Exception):
    """The consumer left in the middle of guided decoding."""


@dataclass(eq=False, slots=True)
class _Eval:
    """Tokens a request wants appended to its sequence next; what its generator yields.

    The scheduler may evaluate them over several decode steps (``done`` counts those already in);
    the request resumes once all are, with the logits after the last one if ``want_logits``.
    """

    tokens: list[int]
    want_logits: bool = True
    prompt: bool = False  # prompt evaluation: fills what the generation tokens leave of a step
    done: int = 0


@dataclass(eq=False)
class _Slot:
    """One llama.cpp sequence of a backend's context: the KV cache of one conversation."""

    seq: int
    tokens: list[int] = field(default_factory=list)  # whose K/V are cached, at positions 0..n-1
    key: str | None = None  # the conversation (GenerationParams.cache_key) the tokens belong to
    user: _Request | None = None  # the request evaluating in it now
    last_used: float = 0.0


class _Cursor:
    """The running request's view of the model for guided decoding (``tool_calling.LanguageModel``).

    Counts every token added after the prompt (sampled, forced, or only counted) against the
    request's budget.
    """

    def __init__(self, backend: LlamaCppBackend, req: _Request, max_new: int):
        self.backend = backend
        self.req = req
        self.max_new = max_new
        self.n_gen = 0

    def tokenize(self, text: str) -> list[int]:
        return self.backend._tokenize(text, add_bos=False)

    def room(self) -> int:
        return self.max_new - self.n_gen

    def evaluate(self, tokens: list[int]) -> Iterator[_Eval]:
        if len(tokens) > self.room():
            raise LLMError("guided decoding went over the token budget")  # a decoder bug, never the client's
        yield from self.backend._eval(self.req, tokens)
        self.n_gen += len(tokens)

    def spend(self, n: int) -> None:
        if not 0 <= n <= self.room():
            raise LLMError("guided decoding went over the token budget")
        self.n_gen += n

    def logits(self) -> np.ndarray:
        return self.req.next_logits()


@dataclass(eq=False)
class _Request:
    messages: list[ChatMessage]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[LLMEvent | BaseException]
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    # Compute-thread state:
    prompt: list[int] | None = None  # the rendered, tokenized conversation
    tools: list[ToolSpec] = field(default_factory=list)
    forced: str | None = None  # see _offered_tools
    slot: _Slot | None = None
    steps: Iterator[_Eval] | None = None  # the generation, once it has a slot
    op: _Eval | None = None  # what it waits to have evaluated
    logits: np.ndarray | None = None  # after its last evaluation
    started: float | None = None  # when its first evaluation began (its queue wait is recorded then)
    served: float = 0.0  # when its last evaluation completed: the oldest go first in a full step
    finished: bool = False
    emitted: bool = False  # some output reached the consumer (it can no longer start over unseen)
    restarted: bool = False  # started over once already (after a cache reset)

    def emit(self, item: LLMEvent | BaseException) -> None:
        """Hand an event to the consumer's loop; a closed loop means nobody is listening anymore."""
        self.emitted = self.emitted or not isinstance(item, BaseException)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:
            self.cancelled.set()

    def next_logits(self) -> np.ndarray:
        if self.logits is None:
            raise LLMError("llama.cpp returned no logits")
        return self.logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _ComputeThread:
    """The single thread that makes every computing llama.cpp call in this process (see module doc).

    Jobs (load, free, small calls, new requests) run as they arrive, between decode steps; the
    backends with requests take one step each in turn.
    """

    _instance: _ComputeThread | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._busy: deque[LlamaCppBackend] = deque()  # backends with requests (compute thread only)
        self._thread = threading.Thread(target=self._run, name="llama-compute", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> _ComputeThread:
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job; it must handle its own errors."""
        self._jobs.put(job)

    def wake(self, backend: LlamaCppBackend) -> None:
        """Compute thread only: the backend has requests, give it steps."""
        if backend not in self._busy:
            self._busy.append(backend)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the compute thread and wait for its result (blocking: not on the event loop)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self._submit_call(fn).result()

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``call`` for coroutines: await the job without blocking the loop."""
        return await asyncio.wrap_future(self._submit_call(fn))

    def _submit_call(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.submit(job)
        return future

    def _run(self) -> None:
        worker.lower_thread_priority("llm")  # before ggml's OpenMP pool is created from this thread
        busy = self._busy
        while True:
            self._take(block=not busy)
            if not busy:
                continue
            backend = busy[0]
            busy.rotate(-1)
            try:
                more = backend._step()
            except BaseException as exc:  # a scheduler bug: fail that model's requests, keep serving
                logger.exception("llama.cpp decode step failed")
                backend._fail_all(LLMError(f"Generation failed: {exc}"))
                more = False
            if not more:
                with contextlib.suppress(ValueError):
                    busy.remove(backend)

    def _take(self, block: bool) -> None:
        """Run the jobs that arrived."""
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            try:
                job()
            except BaseException:
                logger.exception("llama.cpp job failed")


# --- backend ------------------------------------------------------------------------------------------


class LlamaCppBackend:
    """A GGUF model served from the process-wide llama.cpp compute thread; implements ``LLMBackend``."""

    # A request with max_tokens=0 only evaluates its prompt into the conversation's slot, which
    # the next request of that conversation reuses (the engine's speculative prefill).
    prefills = True

    def __init__(self, path: str | Path, *, n_ctx: int = 4096, n_threads: int = 0, name: str | None = None,
                 n_threads_batch: int = 0, flash_attn: bool | None = None, check_batching: bool = True,
                 max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS, n_parallel: int = DEFAULT_PARALLEL,
                 cache_tokens: int = 0):
        """Load the model (blocking, ~0.3-2 s for the bundled models): call it off the event loop.

        ``n_ctx`` is the context of one conversation; ``n_parallel`` conversations keep their KV
        cache at once, in ``cache_tokens`` cells shared by all (0: ``DEFAULT_CACHE_CONTEXTS`` x
        ``n_ctx``). ``max_output_tokens`` bounds a response that sets no ``max_tokens``.

        ``n_threads`` (decode steps of few tokens: generation) defaults to all cores but one.
        ggml's threads spin-wait on each other, so when another busy thread (TTS, STT) takes one of
        their cores, generation collapses (measured on 2 cores with one competing busy process: 86
        -> 1-3 tok/s with 2 threads, unchanged 50 tok/s with 1). Other steps use
        ``n_threads_batch``, default all cores: prompts, and the generation of a lone request while
        no speech model computes (``worker.busy_workers()``; 10.9 vs 5.5 tok/s for the 1.5B on 2
        cores). A positive ``n_threads`` alone sets both.
        """
        self.path = Path(path)
        self.name = name or self.path.stem
        self.max_output_tokens = max(1, max_output_tokens)
        self.n_parallel = max(1, n_parallel)
        self._compute = _ComputeThread.get()
        self._native = self._compute.call(_Native.get)
        self._model: int | None = None
        self._ctx: int | None = None
        self._batch: Any = None
        self._rng = np.random.default_rng()
        self._vocab: TokenVocab | None = None  # token classes for guided decoding, built on first use
        self._model_lock = threading.Lock()  # count_tokens (any thread) vs. freeing the model
        self._closed = False
        # Scheduler state (compute thread only): the sequences, requests waiting for one, and the
        # requests evaluating now, in the order they got their slot.
        self._slots = [_Slot(seq) for seq in range(self.n_parallel)]
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._threads = (0, 0)  # llama.cpp thread counts currently set on the context
        # Counters for diagnostics and tests: requests finished, abandoned mid-way, and dropped while
        # queued; and what the cache did: prompt tokens evaluated or reused, prefixes copied from
        # another slot, slots evicted for another conversation, decode steps and their sequences.
        self.stats = {"completed": 0, "cancelled": 0, "skipped": 0}
        self.cache = {"evaluated": 0, "reused": 0, "shared_prefix": 0, "evicted": 0, "steps": 0,
                      "sequences": 0, "overloaded": 0, "resets": 0}
        self._m_wait = telemetry.LLM_QUEUE_WAIT.labels(self.name)
        self._m_batch = telemetry.LLM_BATCH_SIZE.labels(self.name)
        self._m_decode = telemetry.LLM_DECODE_SECONDS.labels(self.name)
        self._m_active = telemetry.LLM_ACTIVE.labels(self.name)
        self._m_waiting = telemetry.LLM_WAITING.labels(self.name)
        self._m_tokens = {kind: telemetry.LLM_TOKENS.labels(self.name, kind)
                          for kind in ("prompt", "cached", "generated")}
        t0 = time.monotonic()
        try:
            self._compute.call(
                lambda: self._load(n_ctx, n_threads, n_threads_batch, flash_attn, check_batching, cache_tokens)
            )
        except BaseException:
            self._compute.call(self._free)
            raise
        self.load_seconds = time.monotonic() - t0
        logger.info("Loaded %s (%s) in %.2fs: n_ctx=%d x %d conversations in %d cells, threads=%d/%d "
                    "flash_attn=%s eval_batch=%d", self.name, self.description, self.load_seconds,
                    self.context_length, self.n_parallel, self.cache_cells, self.n_threads,
                    self.n_threads_batch, self.flash_attn, self._eval_chunk)

    def _load(self, n_ctx: int, n_threads: int, n_threads_batch: int, flash_attn: bool | None,
              check_batching: bool, cache_tokens: int) -> None:
        native = self._native
        C = native.C
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = C.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise LLMError(f"llama.cpp could not load model {self.path}", code="model_load_failed")
        self._model = model

        n_train = native.n_ctx_train(model)
        if n_ctx <= 0 or (n_train > 0 and n_ctx > n_train):
            n_ctx = n_train if n_train > 0 else 4096
        cores = max(1, os.cpu_count() or 1)
        self.n_threads = n_threads if n_threads > 0 else max(1, cores - 1)
        if n_threads_batch <= 0:
            n_threads_batch = n_threads if n_threads > 0 else cores
        self.n_threads_batch = n_threads_batch
        # ik_llama.cpp's CPU flash attention aborts the process (iqk_fa_templates.h: GGML_ASSERT(S > 0))
        # on batches that mix sequences: it serves one sequence only.
        if flash_attn and self.n_parallel > 1:
            logger.warning("%s: flash attention is off: ik_llama.cpp's cannot serve several sequences", self.name)
        self.flash_attn = self.n_parallel == 1 and (_cpu_supports_flash_attn() if flash_attn is None else flash_attn)
        cells = max(n_ctx, cache_tokens if cache_tokens > 0 else n_ctx * min(self.n_parallel, DEFAULT_CACHE_CONTEXTS))
        cparams = C.llama_context_default_params()
        cparams.n_ctx = cells
        # A step never holds more than _EVAL_CHUNK tokens; a larger batch would only grow the
        # compute buffer (which scales with batch x cells without flash attention).
        cparams.n_batch = min(_EVAL_CHUNK, cells)
        cparams.n_ubatch = min(_EVAL_CHUNK, cells)
        cparams.n_seq_max = self.n_parallel
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads_batch
        cparams.flash_attn = self.flash_attn
        self._threads = (self.n_threads, self.n_threads_batch)
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise LLMError(f"llama.cpp could not create a context for {self.path}", code="model_load_failed")
        self._ctx = ctx
        self.cache_cells = int(native.n_ctx(ctx))
        self.context_length = min(n_ctx, self.cache_cells)
        self._n_batch = int(native.n_batch(ctx))
        self._n_vocab = int(native.n_vocab(model))
        self._batch = C.llama_batch_init(self._n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)

        bos = native.token_bos(model)
        eos = native.token_eos(model)
        self._add_bos = native.add_bos_token(model) == 1
        self._bos_text = self._token_text(bos)
        self.chat_template = ChatTemplate(
            self._meta("tokenizer.chat_template"), bos_token=self._bos_text, eos_token=self._token_text(eos)
        )
        if self.chat_template.is_fallback:
            logger.warning("%s has no chat template; using ChatML", self.path.name)
        self._eval_chunk = min(_EVAL_CHUNK, self._n_batch)
        if check_batching:
            self._check_batching()

    # --- model helpers (any thread) ---

    @property
    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        if self._model:
            self._native.model_desc(self._model, buf, 256)
        return buf.value.decode("utf-8", "replace")

    def _meta(self, key: str) -> str | None:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._native.meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._native.token_get_text(self._model, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def _tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        # Special tokens in the rendered template (<|im_start|>...) must become their ids. Message
        # contents are parsed the same way; that only lets a client forge turns of its own session.
        data = text.encode("utf-8")
        add_special = add_bos and self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        cap = len(data) + 8
        buf = (ctypes.c_int32 * cap)()
        n = self._native.tokenize(self._model, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self._native.tokenize(self._model, data, len(data), buf, cap, add_special, True)
        if n < 0:
            raise LLMError("tokenization failed")
        return list(buf[:n])

    def _check_batching(self) -> None:
        """Detect broken large-batch kernels (see _SAFE_EVAL_CHUNK) before serving any request."""
        tokens = self._tokenize(_BATCH_CHECK_TEXT)[: self._n_batch]
        if len(tokens) < 33 or self._eval_chunk <= _SAFE_EVAL_CHUNK:
            return
        try:
            self._decode_alone(tokens, 0)
            batched = self._last_logits()
            self._reset_cache()
            for start in range(0, len(tokens), _SAFE_EVAL_CHUNK):
                self._decode_alone(tokens[start:start + _SAFE_EVAL_CHUNK], start)
            diff = float(np.max(np.abs(self._last_logits() - batched)))
        finally:
            self._reset_cache()
        if not np.isfinite(diff) or diff > _BATCH_CHECK_TOLERANCE:
            logger.warning("%s: llama.cpp batched evaluation is inaccurate on this CPU (logit error %.1f); "
                           "evaluating prompts %d tokens at a time", self.name, diff, _SAFE_EVAL_CHUNK)
            self._eval_chunk = _SAFE_EVAL_CHUNK
        else:
            logger.debug("%s: batched evaluation check passed (max logit difference %.3f)", self.name, diff)

    def render_prompt(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> str:
        """The exact text the model sees (useful for debugging prompts and in tests)."""
        return self.chat_template.render(messages, add_generation_prompt=True, tools=tools)

    def _prompt_tokens(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> list[int]:
        return self._tokenize(self.render_prompt(messages, tools))

    def _open_prompt_tokens(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> list[int]:
        """The prompt up to the end of the last message's text (`GenerationParams.open_last`).

        Cut where the template wrote that text, so whatever the template puts after it (its end of
        turn, the assistant's header) is left out and any template works.
        """
        if not messages:
            raise LLMError("An open prompt needs a last message", code="invalid_request")
        last = messages[-1]
        marked = [*messages[:-1], dataclasses.replace(last, content=last.content + _CUT_MARK)]
        text = self.chat_template.render(marked, add_generation_prompt=False, tools=tools)
        cut = text.find(_CUT_MARK)
        if cut < 0:
            raise LLMError("The chat template does not show the last message's text", code="chat_template_error")
        return self._tokenize(text[:cut])

    def token_vocab(self) -> TokenVocab:
        """Token classes for guided decoding (compute thread; ~0.1-0.5 s once per model)."""
        if self._vocab is None:
            t0 = time.monotonic()
            native = self._native
            pieces, unusable, eog = [], [], []
            for tok in range(self._n_vocab):
                pieces.append(self._piece(tok))
                if native.token_is_eog(self._model, tok):
                    eog.append(tok)
                    unusable.append(tok)
                elif native.token_is_control(self._model, tok):
                    unusable.append(tok)
            marker = self._tokenize(TOOL_CALL_OPEN, add_bos=False)
            self._vocab = TokenVocab(pieces, unusable=unusable, eog=eog, marker=marker if len(marker) == 1 else ())
            logger.debug("%s: token classes for guided decoding built in %.2fs", self.name, time.monotonic() - t0)
        return self._vocab

    # --- LLMBackend ---

    async def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator[LLMEvent]:
        """Queue a generation and relay its events; leaving early cancels it (even if still queued)."""
        if self._closed:
            raise LLMError("The model is closed", code="model_closed")
        req = _Request(list(messages), params, asyncio.get_running_loop(), asyncio.Queue())
        self._compute.submit(lambda: self._enqueue(req))
        try:
            while True:
                item = await req.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            req.cancelled.set()

    async def count_tokens(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> int:
        """Prompt size for context management; tokenizes in a thread, not behind queued generations."""
        return await asyncio.to_thread(self._count_tokens_sync, list(messages), tools)

    def _count_tokens_sync(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> int:
        with self._model_lock:
            if self._model is None:
                raise LLMError("The model is closed", code="model_closed")
            return len(self._prompt_tokens(messages, tools))

    async def close(self) -> None:
        """Free the model; the running and queued generations end with LLMError(code="model_closed")."""
        if self._closed:
            return
        self._closed = True  # queued requests fail fast, the running one stops at its next token
        await self._compute.run(self._free)

    def _free(self) -> None:
        self._fail_all(LLMError("The model was closed", code="model_closed"))
        C = self._native.C
        with self._model_lock:
            if self._ctx:
                if self._batch is not None:
                    C.llama_batch_free(self._batch)
                    self._batch = None
                C.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                C.llama_free_model(self._model)
                self._model = None

    def __repr__(self) -> str:
        return f"LlamaCppBackend(name={self.name!r}, path={str(self.path)!r}, n_ctx={self.context_length})"

    # --- compute thread: scheduling (see the module doc) ---

    def _enqueue(self, req: _Request) -> None:
        if self._closed:
            req.emit(LLMError("The model is closed", code="model_closed"))
            return
        self._waiting.append(req)
        self._compute.wake(self)

    def _step(self) -> bool:
        """One decode step over every request that can take part; False when none is left."""
        if self._closed or not self._ctx:
            self._fail_all(LLMError("The model was closed", code="model_closed"))
            return False
        for req in [r for r in self._active if r.cancelled.is_set()]:
            self.stats["cancelled"] += 1
            self._retire(req, close=True)
        self._admit()
        parts = self._plan()
        if parts:
            self._run_batch(parts)
        self._m_active.set(len(self._active))
        self._m_waiting.set(len(self._waiting))
        return bool(self._active or self._waiting)

    def _admit(self) -> None:
        """Give waiting requests a slot, in arrival order, while there are idle ones."""
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled.is_set():
                self._waiting.popleft()
                req.finished = True
                self.stats["skipped"] += 1
                continue
            if req.prompt is None:
                try:
                    self._prepare(req)
                except Exception as exc:
                    self._waiting.popleft()
                    req.finished = True
                    if not isinstance(exc, LLMError):
                        logger.exception("Preparing a generation failed")
                        exc = LLMError(f"Generation failed: {exc}")
                    req.emit(exc)
                    continue
            slot = self._pick_slot(req)
            if slot is None:
                return
            self._waiting.popleft()
            slot.user, req.slot = req, slot
            self._active.append(req)
            req.steps = self._serve(req)
            self._advance(req)

    def _prepare(self, req: _Request) -> None:
        """The prompt's tokens (the chat template's errors and the context limit fail the request)."""
        tools, forced = _offered_tools(req.params)
        with self._model_lock:
            if req.params.open_last:
                tokens = self._open_prompt_tokens(req.messages, tools)
            else:
                tokens = self._prompt_tokens(req.messages, tools)
        n_prompt, n_ctx = len(tokens), self.context_length
        if n_prompt >= n_ctx:
            raise LLMError(
                f"The conversation is {n_prompt} tokens; this model's context is {n_ctx} tokens.",
                code="context_length_exceeded",
                details={"prompt_tokens": n_prompt, "context_length": n_ctx},
            )
        req.prompt, req.tools, req.forced = tokens, tools, forced

    def _pick_slot(self, req: _Request) -> _Slot | None:
        """The idle slot for a request (see the module doc), or None when every slot is busy."""
        idle = [s for s in self._slots if s.user is None]
        if not idle:
            return None
        key, prompt = req.params.cache_key, req.prompt or []
        if key is not None:
            for slot in idle:
                if slot.key == key:
                    return slot
        best, common = None, 0
        for slot in idle:
            n = _common_prefix(slot.tokens, prompt)
            if n > common:
                best, common = slot, n
        if best is not None and common == len(best.tokens) and (key is None or best.key is None):
            best.key = key
            return best  # the prompt goes on from this slot's tokens: the same conversation
        fresh = next((s for s in idle if not s.tokens), None) or min(idle, key=lambda s: s.last_used)
        if fresh.tokens:
            self.cache["evicted"] += 1  # another conversation's cache goes (all of it, or all but a prefix)
        fresh.key = key
        if fresh is best:
            return fresh  # evaluation starts after the shared part (see _generate)
        self._clear_slot(fresh)
        if best is not None and common >= _MIN_SHARED_PREFIX:
            n = min(common, len(prompt) - 1)
            self._native.kv_seq_cp(self._ctx, best.seq, fresh.seq, 0, n)
            fresh.tokens = best.tokens[:n]
            self.cache["shared_prefix"] += 1
        return fresh

    def _plan(self) -> list[tuple[_Request, int]]:
        """This step's share of each request: generation first (longest since served first), then
        prompts in arrival order, within the step's token budget."""
        budget = self._eval_chunk
        ready = sorted((r for r in self._active if r.op is not None), key=lambda r: (r.op.prompt, r.served))
        parts: list[tuple[_Request, int]] = []
        for req in ready:
            if budget <= 0:
                break
            op = req.op
            take = min(len(op.tokens) - op.done, budget)
            parts.append((req, take))
            budget -= take
        return parts

    def _run_batch(self, parts: list[tuple[_Request, int]]) -> None:
        """Decode one step and resume the requests whose evaluation it completed."""
        t0 = time.monotonic()
        while parts:
            t0 = time.monotonic()
            rc = self._decode_parts(parts)
            if rc == 0:
                break
            if rc == 1 and self._evict_idle():
                continue  # no room in the cache: made some
            if rc == 1:
                prompts = [p for p in parts if p[0].op.prompt]
                if prompts and len(prompts) < len(parts):
                    parts = [p for p in parts if not p[0].op.prompt]  # new prompts wait for room
                    continue
                victim = max((r for r, _ in parts), key=lambda r: len(r.slot.tokens))
                self.cache["overloaded"] += 1
                self._fail(victim, LLMError("The model's cache is full: too many long conversations at once. "
                                            "Try again shortly.", code="server_overloaded"))
                parts = [p for p in parts if p[0] is not victim]
                continue
            # Any other failure leaves these sequences' cache in an unknown state.
            for req, _ in parts:
                self._clear_slot(req.slot)
                self._fail(req, LLMError(f"llama_decode failed with code {rc}"))
            return
        if not parts:
            return
        now = time.monotonic()
        self._m_decode.inc(now - t0)
        self._m_batch.observe(len(parts))
        self.cache["steps"] += 1
        self.cache["sequences"] += len(parts)
        row = -1
        resume: list[_Request] = []
        poisoned = False
        for req, take in parts:
            op, slot = req.op, req.slot
            row += take
            if req.started is None:
                req.started = t0
                self._m_wait.observe(t0 - req.arrived)
                telemetry.QUEUE_WAITS.observe("llm", t0 - req.arrived)
            slot.tokens.extend(op.tokens[op.done:op.done + take])
            op.done += take
            if op.prompt:
                self.cache["evaluated"] += take
                self._m_tokens["prompt"].inc(take)
            if op.done == len(op.tokens):
                req.logits = self._row_logits(row) if op.want_logits else None
                req.op, req.served = None, now
                resume.append(req)
                poisoned = poisoned or (req.logits is not None and not np.isfinite(req.logits).all())
        if poisoned:
            self._recover_from_nan("llama.cpp returned non-finite logits (NaN/inf)")
            return
        for req in resume:
            self._advance(req)

    def _recover_from_nan(self, why: str) -> None:
        """Forget every conversation's cache and zero its memory, then start the requests in progress
        over (those that have not output anything yet; the others fail).

        A NaN written to the KV cache reaches every sequence, not only its own: attention multiplies
        masked-out cells by 0, and 0 x NaN is NaN. Left alone, one bad evaluation would make every
        later reply of this model fail; after the reset the next evaluations start from a clean cache.
        """
        self.cache["resets"] += 1
        self._reset_cache()  # llama_kv_cache_clear zeroes the cache's buffers too
        for slot in self._slots:
            slot.key = None
        again = [r for r in self._active if not r.finished and not r.emitted and not r.restarted]
        lost = [r for r in self._active if not r.finished and r not in again]
        logger.error("%s: %s: cleared the whole KV cache; %d request(s) start over, %d fail", self.name, why,
                     len(again), len(lost))
        exc = LLMError("The model produced invalid numbers (NaN) in the middle of this reply; its cache was "
                       "reset. Please try again.", code="model_error")
        for req in lost:
            self._fail(req, exc)
        for req in reversed(again):
            self._active.remove(req)
            steps, req.steps, req.op, req.logits = req.steps, None, None, None
            with contextlib.suppress(Exception):
                steps.close()  # type: ignore[union-attr]
            if req.slot is not None and req.slot.user is req:
                req.slot.user = None
            req.slot, req.restarted = None, True
            self._waiting.appendleft(req)

    def _decode_parts(self, parts: list[tuple[_Request, int]]) -> int:
        """Fill the batch with each request's next `take` tokens (its own sequence) and decode."""
        batch = self._batch
        i = 0
        for req, take in parts:
            op, seq, pos = req.op, req.slot.seq, len(req.slot.tokens)
            tokens = op.tokens
            for j in range(take):
                batch.token[i] = tokens[op.done + j]
                batch.pos[i] = pos + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 0
                i += 1
            if op.want_logits and op.done + take == len(tokens):
                batch.logits[i - 1] = 1
        batch.n_tokens = i
        # No step uses every core while a speech model computes: two spinning ggml threads with one
        # core taken collapse, for prompts as for generation (bench/concurrency.py, 8 calls, this
        # box, quiet: prompt steps of ~30 tokens took 2-2.8 s with 2 threads; with 1 thread while
        # speech computes the p50 first audible reply went 10.1 -> 5.7 s, 16 calls 19.4 -> 12.4 s).
        # Otherwise prompts (a prompt part, or many tokens) use every core; generation uses every
        # core while no speech model computes (see __init__): a lone request whenever speech is
        # idle at that moment, a batch only after
        # a second without speech (text sessions). With several calls their speech keeps a core
        # busy most of the time, and a step that collides with it stalls both: bench/concurrency.py,
        # 4 calls, qwen2.5-1.5b, quiet machine: 2 threads whenever speech was idle gave 8.3 s to
        # first audio and a 9.4 s gap in one reply, 1 thread 7.0-7.3 s and gaps under 1 s.
        speech_busy = busy_workers() > 0
        many = not speech_busy and (i >= _BATCH_THREADS_MIN_TOKENS or len(parts) == 1
                                    or any(req.op.prompt for req, _ in parts)
                                    or speech_idle_s() > _SPEECH_QUIET_S)
        threads = self.n_threads_batch if many else self.n_threads
        if self._threads != (threads, threads):
            self._native.set_n_threads(self._ctx, threads, threads)
            self._threads = (threads, threads)
        return int(self._native.C.llama_decode(self._ctx, batch))

    def _row_logits(self, row: int) -> np.ndarray:
        ptr = self._native.C.llama_get_logits_ith(self._ctx, row)
        if not ptr:
            raise LLMError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def _evict_idle(self) -> bool:
        """Free the cache of the least recently used idle conversation; False if there is none."""
        idle = [s for s in self._slots if s.user is None and s.tokens]
        if not idle:
            return False
        slot = min(idle, key=lambda s: s.last_used)
        self._clear_slot(slot)
        slot.key = None
        self.cache["evicted"] += 1
        return True

    def _clear_slot(self, slot: _Slot | None) -> None:
        if slot is not None and slot.tokens:
            if not self._native.kv_seq_rm(self._ctx, slot.seq, 0, -1):
                logger.warning("%s: llama.cpp could not clear sequence %d", self.name, slot.seq)
            slot.tokens = []

    def _advance(self, req: _Request) -> None:
        """Run a request's Python until it wants the model again (or ends)."""
        try:
            req.op = next(req.steps)  # type: ignore[arg-type]
        except StopIteration:
            self._retire(req)
        except BaseException as exc:
            logger.exception("Generation failed")
            self._fail(req, LLMError(f"Generation failed: {exc}"))

    def _retire(self, req: _Request, close: bool = False) -> None:
        """The request leaves the scheduler; its slot (and what it evaluated) stays for its next turn."""
        if req.finished:
            return
        req.finished = True
        with contextlib.suppress(ValueError):
            self._active.remove(req)
        steps, req.steps, req.op = req.steps, None, None
        if close and steps is not None:
            with contextlib.suppress(Exception):
                steps.close()  # type: ignore[attr-defined]
        slot = req.slot
        if slot is not None and slot.user is req:
            slot.user = None
            slot.last_used = time.monotonic()

    def _fail(self, req: _Request, exc: LLMError) -> None:
        req.emit(exc)
        self._retire(req, close=True)

    def _fail_all(self, exc: LLMError) -> None:
        for req in [*self._active, *self._waiting]:
            if not req.finished:
                self._fail(req, exc)
        self._waiting.clear()
        self._active.clear()

    def _serve(self, req: _Request) -> Iterator[_Eval]:
        """One request's generation (counted in `stats`), as steps for the scheduler."""
        try:
            if not (yield from self._generate(req)):
                self.stats["cancelled"] += 1
        except LLMError as exc:
            req.emit(exc)
        except Exception as exc:
            logger.exception("Generation failed")
            req.emit(LLMError(f"Generation failed: {exc}"))

    def _eval(self, req: _Request, tokens: list[int], want_logits: bool = True,
              prompt: bool = False) -> Iterator[_Eval]:
        """Have `tokens` appended to the request's sequence; afterwards stop if it was abandoned."""
        if tokens:
            yield _Eval(list(tokens), want_logits, prompt)
        if self._stopped(req):
            raise _Stop

    def _check_open(self) -> None:
        if self._closed:
            raise LLMError("The model was closed", code="model_closed")

    def _stopped(self, req: _Request) -> bool:
        """Checked between tokens: the consumer left (True) or the backend is closing (raises)."""
        self._check_open()
        return req.cancelled.is_set()

    def _rollback(self, slot: _Slot, pos: int) -> None:
        """Forget the slot's cached tokens from position `pos` on."""
        if pos >= len(slot.tokens):
            return
        if self._native.kv_seq_rm(self._ctx, slot.seq, pos, -1):
            del slot.tokens[pos:]
        else:
            raise LLMError("llama.cpp could not remove tokens from its cache")

    def _decode_alone(self, tokens: list[int], start: int) -> None:
        """Evaluate tokens in sequence 0 outside the scheduler (the load-time check only)."""
        batch = self._batch
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = int(i == len(tokens) - 1)
        batch.n_tokens = len(tokens)
        rc = self._native.C.llama_decode(self._ctx, batch)
        if rc != 0:
            raise LLMError(f"llama_decode failed with code {rc}")

    def _last_logits(self) -> np.ndarray:
        return self._row_logits(-1)

    def _reset_cache(self) -> None:
        self._native.C.llama_kv_cache_clear(self._ctx)
        for slot in self._slots:
            slot.tokens = []

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = self._native.token_to_piece(self._model, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._native.token_to_piece(self._model, token, buf, len(buf), 0, False)
        return buf.raw[:n] if n > 0 else b""

    def _generate(self, req: _Request) -> Steps[bool]:
        """Run one request in its slot (counted in `stats` as completed); False if the consumer went
        away first."""
        params, tokens, tools, forced, slot = req.params, req.prompt or [], req.tools, req.forced, req.slot
        assert slot is not None
        n_prompt, n_ctx = len(tokens), self.context_length
        if self._stopped(req):
            return False

        # Reuse the longest common prefix of what the slot has cached.
        common = max(0, min(_common_prefix(slot.tokens, tokens), n_prompt - 1))  # the last one gives logits
        if common < len(slot.tokens):
            if self._native.kv_seq_rm(self._ctx, slot.seq, common, -1):
                del slot.tokens[common:]
            else:
                self._clear_slot(slot)
                common = 0
        cached_tokens = common
        self.cache["reused"] += common
        self._m_tokens["cached"].inc(common)

        try:
            yield from self._eval(req, tokens[common:], prompt=True)
            t_prompt = time.monotonic()

            cap = self.max_output_tokens if params.max_tokens is None else max(params.max_tokens, 0)
            if params.open_last:
                cap = 0  # the prompt stops inside a message: nothing to answer yet
            max_new = min(cap, n_ctx - n_prompt)
            rng = np.random.default_rng(params.seed) if params.seed is not None else self._rng
            cursor = _Cursor(self, req, max_new)
            if max_new <= 0:
                finish = "length"  # a prefill (max_tokens=0), or a prompt that fills the context
            elif forced is not None:
                # tool_choice "required" or a named function: the reply is a call, whatever the model.
                cut = yield from self._tool_calls(req, cursor, rng, tools, forced or None, single=True,
                                                  opening=TOOL_CALL_OPEN + CALL_PREFIX)
                finish = "length" if cut else "tool_calls"
            else:
                finish = yield from self._free_text(req, cursor, rng, tools)
        except _Stop:
            return False
        n_gen = cursor.n_gen
        self._m_tokens["generated"].inc(n_gen)
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, cached_tokens=cached_tokens)
        self.stats["completed"] += 1  # before the consumer can see the end
        req.emit(Finished(finish_reason=finish, usage=usage))  # type: ignore[arg-type]
        self._log_request(req, n_prompt, cached_tokens, n_gen, finish, t_prompt)
        return True

    def _free_text(self, req: _Request, cursor: _Cursor, rng: np.random.Generator,
                   tools: list[ToolSpec]) -> Steps[str]:
        """The reply under tool_choice "auto": a call or text, decided on the first logits.

        The model opens a call when it puts at least ``CALL_FLOOR`` on starting one in any form
        (more after a tool result, when the reply should answer from it) and, with the opening
        written, is sure which function (``NAME_CONFIDENCE``); the call is then written in the
        canonical form, schema-guided. Otherwise the reply is text that cannot open with call
        syntax, so JSON is never spoken; a ``<tool_call>`` later in it still becomes a call.
        A call identical to one already answered since the user spoke is taken back and the reply
        is text instead (no loops); so is a call none of whose values comes from the conversation
        (``tool_calling.grounded``: an invented order number).
        """
        if not tools:
            return (yield from self._text(req, cursor, rng, []))
        vocab = self.token_vocab()
        p_call = call_probability(req.next_logits(), vocab)
        after_result = bool(req.messages) and req.messages[-1].role == "tool"
        floor = CALL_THRESHOLD_AFTER_RESULT if after_result else CALL_FLOOR
        logger.debug("%s: call probability %.2f (floor %.2f)", self.name, p_call, floor)
        if p_call >= floor:
            finish = yield from self._try_calls(req, cursor, rng, tools, TOOL_CALL_OPEN + CALL_PREFIX,
                                                min_confidence=NAME_CONFIDENCE)
            if finish is not None:
                return finish
            # It would have repeated an answered call, or invented one: answer in words, and with
            # no machine text at all (the model still wants a call and would write it out).
            return (yield from self._text(req, cursor, rng, [], plain_start=True, no_syntax=True))
        return (yield from self._text(req, cursor, rng, tools, plain_start=True))

    def _try_calls(self, req: _Request, cursor: _Cursor, rng: np.random.Generator, tools: list[ToolSpec],
                   opening: str, min_confidence: float = 0.0) -> Steps[str | None]:
        """Guided calls from here on: the finish reason, or None when the model is unsure which
        function to call (`min_confidence`), or the first call repeats an answered one or is not
        grounded in the conversation (the cache, the logits and the budget are then back as they were)."""
        slot = req.slot
        assert slot is not None
        pos, n0 = len(slot.tokens), cursor.n_gen
        single = req.params.parallel_tool_calls is False
        answered = answered_calls(req.messages)
        said = [m.content for m in req.messages if m.content]

        def reject(name: str, arguments: str) -> bool:
            return call_key(name, arguments) in answered or not grounded(arguments, said)

        cut = yield from self._tool_calls(req, cursor, rng, tools, None, single=single, opening=opening,
                                          reject=reject, min_confidence=min_confidence)
        if cut is None:
            yield from self._rewind(req, pos)
            cursor.n_gen = n0
            return None
        return "length" if cut else "tool_calls"

    def _rewind(self, req: _Request, pos: int) -> Steps[None]:
        """Back to the slot's first `pos` tokens, with the logits after them (the last one is evaluated again)."""
        slot = req.slot
        assert slot is not None and 0 < pos <= len(slot.tokens)
        last = slot.tokens[pos - 1]
        self._rollback(slot, pos - 1)
        yield from self._eval(req, [last])

    def _text(self, req: _Request, cursor: _Cursor, rng: np.random.Generator, tools: list[ToolSpec],
              plain_start: bool = False, no_syntax: bool = False) -> Steps[str]:
        """Sample text; with `tools`, a ``<tool_call>`` in the output switches to guided calls.

        `plain_start`: the first token may not open call syntax; `no_syntax`: no token may (after a
        call was taken back). The reply never ends before it says something (a small model may want
        to end a turn after a tool result at once).
        """
        params, slot = req.params, req.slot
        assert slot is not None
        vocab = self.token_vocab()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = CallScanner(TOOL_CALL_OPEN) if tools else None
        guard = NameGuard(vocab, [t.name for t in params.tools]) if params.tools else None
        written = ""  # the reply's last characters, for the guard
        starts: list[tuple[int, int]] = []  # (offset in the reply, KV position) of each token
        max_new = cursor.max_new
        first, spoke = True, False
        finish = "length"
        while cursor.n_gen < max_new:
            if self._stopped(req):
                raise _Stop
            logits = req.next_logits()
            if no_syntax:
                logits = _masked(logits, vocab.call_start if first else vocab.syntax_any)
            elif first and plain_start:
                logits = _masked(logits, vocab.call_start)
            if not spoke:
                logits = _masked(logits, vocab.unusable)
            if guard is not None:
                logits = _masked(logits, guard.banned(written))
            first = False
            token = sample_token(logits, params, rng)
            # End-of-generation tokens end the reply; so does any other control token (e.g. a
            # hallucinated <|im_start|> opening a new turn), which must never reach the client.
            if self._native.token_is_eog(self._model, token) or self._native.token_is_control(
                self._model, token
            ):
                finish = "stop"
                break
            cursor.n_gen += 1
            text = decoder.decode(self._piece(token))
            written = (written + text)[-64:]
            opening = None
            if scanner is not None:
                starts.append((len(scanner.text), len(slot.tokens)))
                text, opening = scanner.push(text)
            if text:
                spoke = spoke or bool(text.strip())
                req.emit(TextDelta(text))
            if cursor.n_gen < max_new:
                yield from self._eval(req, [token])
            if opening is not None and scanner is not None and scanner.bare and not self._names_a_tool(
                    req, scanner, tools, cursor.n_gen < max_new):
                # A JSON reply that does not name one of the tools is just text.
                opening = None
                if held := scanner.reject_bare():
                    req.emit(TextDelta(held))
            if opening is not None and scanner is not None:
                # Take back the tokens of the opening as the model wrote it and continue from the
                # canonical form, so the context always reads `<tool_call>\n{"name": "`.
                offset, pos = next((o, p) for o, p in reversed(starts) if o <= opening)
                self._rollback(slot, pos)
                lead = scanner.text[offset:opening]
                finish_calls = yield from self._try_calls(req, cursor, rng, tools,
                                                          lead + TOOL_CALL_OPEN + CALL_PREFIX)
                if finish_calls is not None:
                    return finish_calls
                scanner, no_syntax = None, True  # a repeated or invented call: the reply goes on in words
        # An incomplete UTF-8 sequence left at a length cut is dropped rather than shown as U+FFFD.
        if scanner is not None and (held := scanner.flush()):
            req.emit(TextDelta(held))  # the start of a marker that never completed
        return finish

    def _names_a_tool(self, req: _Request, scanner: CallScanner, tools: list[ToolSpec], have_logits: bool) -> bool:
        """After a bare ``{"name": "``: does the model go on with one of the tool names?"""
        names = [t.name for t in tools]
        after = scanner.after_bare_opening()
        if after:
            return could_start_name(after, names)
        if not have_logits:
            return False
        token = int(np.argmax(req.next_logits()))
        piece = self._piece(token).decode("utf-8", "replace")
        return bool(piece) and could_start_name(piece, names)

    def _tool_calls(self, req: _Request, cursor: _Cursor, rng: np.random.Generator, tools: list[ToolSpec],
                    name: str | None, single: bool, opening: str,
                    reject: Callable[[str, str], bool] | None = None,
                    min_confidence: float = 0.0) -> Steps[bool | None]:
        """Guided ``<tool_call>`` blocks: one when forced (`single`), else as many as the model writes.

        `name`: the function to call (None: the model picks among `tools`). True when the budget
        cut the first call short (or before it began): the response is incomplete. None when the
        model is less sure than `min_confidence` of the first call's function, or the first call
        is one `reject`(name, arguments) refuses: nothing was emitted, the caller takes it back
        (later ones it refuses are dropped).
        """
        params = req.params
        vocab = self.token_vocab()
        guide = GuidedDecoder(cursor, vocab, lambda logits: sample_token(logits, params, rng))
        t0, n0 = time.monotonic(), cursor.n_gen
        index, cut = yield from self._guided_calls(req, guide, tools, name, single, opening, reject,
                                                   min_confidence)
        if index < 0:
            why = "unsure of the function" if guide.declined else "repeats an answered one or invents its values"
            logger.debug("%s: took back a call: %s", self.name, why)
            return None
        elapsed = time.monotonic() - t0
        logger.debug("%s: %d guided tool call(s)%s, %d tokens (%d sampled, %d model calls, %d squeezed by the "
                     "budget) in %.2fs (%.1f tok/s)", self.name, index, " cut by the budget" if cut else "",
                     cursor.n_gen - n0, guide.samples, guide.evaluations, guide.squeezes, elapsed,
                     (cursor.n_gen - n0) / max(elapsed, 1e-6))
        return cut

    def _guided_calls(self, req: _Request, guide: GuidedDecoder, tools: list[ToolSpec], name: str | None,
                      single: bool, opening: str, reject: Callable[[str, str], bool] | None,
                      min_confidence: float = 0.0) -> Steps[tuple[int, bool]]:
        """The call loop of `_tool_calls`: (calls emitted, whether the first one was cut short);
        (-1, False) when the first call is declined (`min_confidence`) or `reject` refuses it."""
        vocab = guide.vocab
        index = 0
        seen: set[tuple[str, str]] = set()
        # The first call streams, unless `reject` is to check it. Later ones are held until
        # complete: small models tend to repeat a call, invent one, or start one more than the
        # budget allows; those are dropped and the reply ends.
        held: list[ToolCallDelta] = []
        current: dict[str, str] = {}
        hold_first = reject is not None

        def rejected() -> bool:
            return reject is not None and reject(current.get("name", ""), current.get("args", ""))

        def on_name(function: str) -> Callable[[str], None]:
            i = index
            first = ToolCallDelta(index=i, call_id=new_call_id(), name=function)
            current.update(name=function, args="")

            def out(delta: ToolCallDelta) -> None:
                if i == 0 and not hold_first:
                    req.emit(delta)
                else:
                    held.append(delta)

            out(first)

            def args(text: str) -> None:
                current["args"] += text
                out(ToolCallDelta(index=i, arguments=text))
            return args

        while True:
            squeezes = guide.squeezes
            yield from guide.tool_call(tools, name, on_name, opening=opening,
                                       min_confidence=min_confidence if index == 0 else 0.0)
            if index == 0 and guide.name_confidence is not None:
                if logger.isEnabledFor(logging.DEBUG):  # bench/tool_probe.py reads this line
                    ranked = sorted(guide.name_probabilities.items(), key=lambda kv: -kv[1])
                    logger.debug("%s: name confidence %.2f (needed %.2f); names %s", self.name,
                                 guide.name_confidence, min_confidence,
                                 " ".join(f"{k}={v:.3f}" for k, v in ranked))
            if guide.declined:
                return -1, False
            squeezed = guide.squeezes > squeezes  # the budget shortened this call
            more = False
            if not single and index + 1 < MAX_CALLS_PER_RESPONSE:
                more = yield from guide.another_call(vocab.eog)  # commits this call's end first
            if not more:
                guide.finish()  # the call's last text: counted and shown, never evaluated
            # The arguments are complete only now (their last piece is shown when committed).
            if index == 0 and rejected():
                return -1, False
            if index == 0 and (guide.truncated or not current):
                return 0 if not current else 1, True
            key = call_key(current.get("name", ""), current.get("args", ""))
            if index == 0 and hold_first:
                for delta in held:
                    req.emit(delta)
                held.clear()
            if index > 0:
                if key in seen or guide.truncated or squeezed or rejected():
                    logger.debug("%s: dropped a repeated or budget-shortened extra tool call %s", self.name, key[0])
                    break
                for delta in held:
                    req.emit(delta)
                held.clear()
            seen.add(key)
            index += 1
            if not more:
                break
            opening = CALL_PREFIX
        return index, False

    def _log_request(self, req: _Request, n_prompt: int, cached: int, n_gen: int, finish: str,
                     t_prompt: float) -> None:
        t_end = time.monotonic()
        started = req.started if req.started is not None else t_prompt  # nothing to evaluate: no wait
        logger.debug(
            "%s: waited %.2fs, prompt %d tok (%d cached) in %.2fs, %d tok generated in %.2fs (%.1f tok/s), %s",
            self.name, started - req.arrived, n_prompt, cached, t_prompt - started, n_gen, t_end - t_prompt,
            n_gen / max(t_end - t_prompt, 1e-6), finish,
        )
