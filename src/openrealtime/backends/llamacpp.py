"""In-process llama.cpp backend (ik_llama.cpp through the ``ik-llama-cpp-python`` ctypes bindings).

Concurrency model: one model and one llama context per backend instance, shared by every session
that uses that model. All llama.cpp work of the process (loading, prompt evaluation, generation,
freeing) runs on a single compute thread. Generations take turns on it: each is a generator that
pauses before every llama_decode call, and a generation that has had the model for a time slice
(``_SLICE_S``) while others wait goes to the back of the line. One long or hostile request therefore
delays another session's first token by about one slice plus that session's own prompt, not by
its whole length. The llama context holds a single KV sequence, so switching between two requests
of the same model copies the KV cache of the one that pauses out to memory and back when it
resumes (``llama_state_seq_get/set_data``: a few milliseconds, against seconds to evaluate the
prompt again, which stays the fallback). Serving several sequences in one batch is a possible later
improvement.

Why one thread for everything: ggml computes with OpenMP, which keeps a thread team per calling
thread. As soon as more OpenMP threads exist than cores (two calling threads x 2 threads), libgomp
stops spin-waiting between parallel regions and decoding becomes 3-4x slower (measured on 2 cores).

``stream()`` never blocks the event loop: it queues a request and receives its events through an
``asyncio.Queue`` fed with ``call_soon_threadsafe``. Leaving the stream early (``aclose()``, task
cancellation) sets a flag that the compute thread checks between tokens; a request abandoned while
still queued never runs.

Every token a response writes counts against its budget: ``max_tokens``, or when that is None
(``max_output_tokens: "inf"``) ``max_output_tokens`` of the backend (4096 by default, the hosted
API's limit), and never more than the context has left. That includes schema-guided tool calls
(see ``tool_calling``): a schema demanding more than the budget is cut with finish "length".

Each backend remembers the token sequence that is in its KV cache. A new request whose prompt
extends the previous one (the next turn of the same conversation) only evaluates the new suffix,
which is what makes multi-turn voice latency acceptable on a CPU.

The high-level ``ik_llama_cpp.IkLlama`` is not used: it hard-codes a Gemma chat template and clears
the KV cache on every call. Only the low-level bindings are used, plus a few C functions the
bindings do not wrap (KV-cache sequence removal, metadata, logging), declared here.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import ctypes
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
    Steps,
    TokenVocab,
    could_start_name,
    new_call_id,
    template_messages,
    template_supports_tools,
)

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
# How long a generation keeps the compute thread while others wait (see the module doc), and at
# least this many times what switching to it cost (so that switches stay a small part of the time
# even when a paused request's prompt must be evaluated again).
_SLICE_S = 0.25
_SLICE_PER_SWITCH_COST = 4
# Most memory a backend spends on KV caches of paused requests (~23-28 KB per token for the bundled
# models); beyond it a paused request's prompt is evaluated again when it resumes.
_SAVED_KV_BYTES = 1 << 30

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
        # KV cache of one sequence to memory and back. Recent ik_llama.cpp takes a trailing flags
        # argument (0: everything); builds without it ignore the extra register argument.
        size_t = ctypes.c_size_t
        self.state_seq_get_size = bind("llama_state_seq_get_size", [vp, i32, u32], size_t)
        self.state_seq_get_data = bind("llama_state_seq_get_data", [vp, vp, size_t, i32, u32], size_t)
        self.state_seq_set_data = bind("llama_state_seq_set_data", [vp, vp, size_t, i32, u32], size_t)

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
            return self._template.render(
                messages=msgs,
                tools=tool_var,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
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
    """Pick the next token: greedy at temperature 0, else top-k -> top-p -> temperature.

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
    scaled = (cand - cand[0]) / params.temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    return int(idx[rng.choice(len(idx), p=probs)])


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

    def evaluate(self, tokens: list[int]) -> Iterator[None]:
        if len(tokens) > self.room():
            raise LLMError("guided decoding went over the token budget")  # a decoder bug, never the client's
        b = self.backend
        for start in range(0, len(tokens), b._eval_chunk):
            yield from b._checkpoint(self.req)
            chunk = tokens[start:start + b._eval_chunk]
            b._decode(chunk, len(b._cached), want_logits=start + len(chunk) == len(tokens))
        self.n_gen += len(tokens)

    def spend(self, n: int) -> None:
        if not 0 <= n <= self.room():
            raise LLMError("guided decoding went over the token budget")
        self.n_gen += n

    def logits(self) -> np.ndarray:
        return self.backend._logits()


@dataclass(eq=False)
class _Request:
    messages: list[ChatMessage]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[LLMEvent | BaseException]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Compute-thread state while it takes turns with other requests of the same model:
    threads: tuple[int, int] | None = None  # llama.cpp thread counts it wants (None: the backend's)
    saved: tuple[Any, int] | None = None  # its KV cache (buffer, bytes), copied out while others run
    saved_tokens: list[int] | None = None  # the tokens of that cache
    finished: bool = False

    def emit(self, item: LLMEvent | BaseException) -> None:
        """Hand an event to the consumer's loop; a closed loop means nobody is listening anymore."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:
            self.cancelled.set()


@dataclass(eq=False)
class _Task:
    """A generation on the compute thread: runs until its next pause (before a llama_decode)."""

    steps: Iterator[None]


class _ComputeThread:
    """The single thread that makes every computing llama.cpp call in this process (see module doc).

    Jobs (load, free, small calls) run as they arrive, between the steps of generations; the
    generations take turns in time slices.
    """

    _instance: _ComputeThread | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | _Task] = queue.SimpleQueue()
        self.slice_s = _SLICE_S
        self.switches = 0  # generations sent to the back of the line for a waiting one
        self._switch_cost = 0.0  # seconds the running step spent restoring model state
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

    def start(self, steps: Iterator[None]) -> None:
        """Queue a generation (a generator pausing before each model evaluation; it must handle its
        own errors). It shares the thread with the others in time slices."""
        self._jobs.put(_Task(steps))

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

    def charge(self, seconds: float) -> None:
        """Record time the running step spent switching model state (it lengthens that turn)."""
        self._switch_cost += seconds

    def _run(self) -> None:
        ready: deque[_Task] = deque()
        head: _Task | None = None
        since = turn = 0.0
        while True:
            self._take(ready, block=not ready)
            if not ready:
                continue
            task = ready[0]
            first = task is not head
            if first:
                head, since = task, time.monotonic()
            self._switch_cost = 0.0
            try:
                next(task.steps)
            except StopIteration:
                ready.popleft()
                continue
            except BaseException:
                logger.exception("llama.cpp generation failed")
                ready.popleft()
                continue
            if first:
                turn = max(self.slice_s, _SLICE_PER_SWITCH_COST * self._switch_cost)
            if len(ready) > 1 and time.monotonic() - since >= turn:
                ready.rotate(-1)  # the longest-waiting generation goes next
                self.switches += 1

    def _take(self, ready: deque[_Task], block: bool) -> None:
        """Run the jobs that arrived and line up the new generations."""
        while True:
            try:
                item = self._jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(item, _Task):
                ready.append(item)
                continue
            try:
                item()
            except BaseException:
                logger.exception("llama.cpp job failed")


# --- backend ------------------------------------------------------------------------------------------


class LlamaCppBackend:
    """A GGUF model served from the process-wide llama.cpp compute thread; implements ``LLMBackend``."""

    def __init__(self, path: str | Path, *, n_ctx: int = 4096, n_threads: int = 0, name: str | None = None,
                 n_threads_batch: int = 0, flash_attn: bool | None = None, check_batching: bool = True,
                 max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS):
        """Load the model (blocking, ~0.3-2 s for the bundled models): call it off the event loop.

        ``max_output_tokens`` bounds a response that sets no ``max_tokens``.

        ``n_threads`` (token generation) defaults to all cores but one. ggml's threads spin-wait on
        each other, so when another busy thread (TTS, STT) takes one of their cores, generation
        collapses (measured on 2 cores with one competing busy process: 86 -> 1-3 tok/s with
        2 threads, unchanged 50 tok/s with 1). Prompt evaluation (``n_threads_batch``), which
        mostly runs while the rest of the pipeline waits for the reply, defaults to all cores.
        A positive ``n_threads`` alone sets both.
        """
        self.path = Path(path)
        self.name = name or self.path.stem
        self.max_output_tokens = max(1, max_output_tokens)
        self._compute = _ComputeThread.get()
        self._native = self._compute.call(_Native.get)
        self._model: int | None = None
        self._ctx: int | None = None
        self._batch: Any = None
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order (positions 0..n-1)
        self._rng = np.random.default_rng()
        self._vocab: TokenVocab | None = None  # token classes for guided decoding, built on first use
        self._model_lock = threading.Lock()  # count_tokens (any thread) vs. freeing the model
        self._closed = False
        self._owner: _Request | None = None  # the request whose tokens are in the KV cache
        self._saved_bytes = 0  # KV caches of paused requests held in memory
        self._threads = (0, 0)  # llama.cpp thread counts currently set on the context
        # Counters for diagnostics: requests finished, abandoned mid-way, and dropped while queued.
        self.stats = {"completed": 0, "cancelled": 0, "skipped": 0}
        # Taking turns: KV caches copied out and back in (or evaluated again), and the time it took.
        self.swaps = {"saved": 0, "restored": 0, "evaluated_again": 0, "seconds": 0.0}
        t0 = time.monotonic()
        try:
            self._compute.call(
                lambda: self._load(n_ctx, n_threads, n_threads_batch, flash_attn, check_batching)
            )
        except BaseException:
            self._compute.call(self._free)
            raise
        self.load_seconds = time.monotonic() - t0
        logger.info("Loaded %s (%s) in %.2fs: n_ctx=%d threads=%d/%d flash_attn=%s eval_batch=%d", self.name,
                    self.description, self.load_seconds, self.context_length, self.n_threads,
                    self.n_threads_batch, self.flash_attn, self._eval_chunk)

    def _load(self, n_ctx: int, n_threads: int, n_threads_batch: int, flash_attn: bool | None,
              check_batching: bool) -> None:
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
        self.flash_attn = _cpu_supports_flash_attn() if flash_attn is None else flash_attn
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = min(512, n_ctx)
        cparams.n_ubatch = min(512, n_ctx)
        cparams.n_seq_max = 1
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads_batch
        cparams.flash_attn = self.flash_attn
        self._threads = (self.n_threads, self.n_threads_batch)
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise LLMError(f"llama.cpp could not create a context for {self.path}", code="model_load_failed")
        self._ctx = ctx
        self.context_length = int(native.n_ctx(ctx))
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
            self._decode(tokens, 0, want_logits=True)
            batched = self._logits().copy()
            self._reset_cache()
            for start in range(0, len(tokens), _SAFE_EVAL_CHUNK):
                chunk = tokens[start:start + _SAFE_EVAL_CHUNK]
                self._decode(chunk, start, want_logits=start + len(chunk) == len(tokens))
            diff = float(np.max(np.abs(self._logits() - batched)))
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
            self._vocab = TokenVocab(pieces, unusable=unusable, eog=eog)
            logger.debug("%s: token classes for guided decoding built in %.2fs", self.name, time.monotonic() - t0)
        return self._vocab

    # --- LLMBackend ---

    async def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator[LLMEvent]:
        """Queue a generation and relay its events; leaving early cancels it (even if still queued)."""
        if self._closed:
            raise LLMError("The model is closed", code="model_closed")
        req = _Request(list(messages), params, asyncio.get_running_loop(), asyncio.Queue())
        self._compute.start(self._serve(req))
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

    # --- compute thread ---

    def _serve(self, req: _Request) -> Iterator[None]:
        """Compute-thread generation for one request (pauses before each llama_decode)."""
        if req.cancelled.is_set():
            req.finished = True
            self.stats["skipped"] += 1
            return
        try:
            self._check_open()
            self._activate(req)
            if not (yield from self._generate(req)):
                self.stats["cancelled"] += 1
        except LLMError as exc:
            req.emit(exc)
        except Exception as exc:
            logger.exception("Generation failed")
            req.emit(LLMError(f"Generation failed: {exc}"))
        finally:
            req.finished = True
            self._drop_saved(req)

    def _checkpoint(self, req: _Request) -> Iterator[None]:
        """Where the compute thread may give the model to another request: just before a decode,
        so that no logits are needed from before the pause. Afterwards the request stops if it was
        abandoned, else gets its KV cache back."""
        yield
        if self._stopped(req):
            raise _Stop
        self._activate(req)

    def _activate(self, req: _Request) -> None:
        """Make the model state the request's own (after other requests of this model ran)."""
        owner = self._owner
        if owner is not req:
            if owner is not None and not owner.finished and not owner.cancelled.is_set() and owner.saved_tokens is None:
                self._save(owner)
            if req.saved_tokens is not None:
                self._restore(req)
            self._owner = req
        threads = req.threads or (self.n_threads, self.n_threads_batch)
        if threads != self._threads:
            self._native.set_n_threads(self._ctx, *threads)
            self._threads = threads

    def _save(self, req: _Request) -> None:
        """Copy the KV cache of a request that pauses out to memory (within `_SAVED_KV_BYTES`)."""
        t0 = time.monotonic()
        req.saved_tokens = list(self._cached)
        req.saved = None
        if self._cached:
            native = self._native
            size = native.state_seq_get_size(self._ctx, 0, 0)
            if 0 < size <= _SAVED_KV_BYTES - self._saved_bytes:
                buf = (ctypes.c_uint8 * size)()
                n = native.state_seq_get_data(self._ctx, buf, size, 0, 0)
                if 0 < n <= size:
                    req.saved = (buf, n)
                    self._saved_bytes += size
        self.swaps["saved"] += 1
        self._swap_time(time.monotonic() - t0)

    def _swap_time(self, seconds: float) -> None:
        self.swaps["seconds"] += seconds
        self._compute.charge(seconds)

    def _drop_saved(self, req: _Request) -> tuple[Any, int] | None:
        saved, req.saved = req.saved, None
        if saved is not None:
            self._saved_bytes -= len(saved[0])
        return saved

    def _restore(self, req: _Request) -> None:
        """Put a request's saved KV cache back; evaluate its tokens again if there is none."""
        t0 = time.monotonic()
        tokens = req.saved_tokens or []
        saved = self._drop_saved(req)
        req.saved_tokens = None
        self._reset_cache()
        if saved is not None and self._native.state_seq_set_data(self._ctx, saved[0], saved[1], 0, 0) > 0:
            self._cached = tokens
            self.swaps["restored"] += 1
        else:
            self._reset_cache()
            for start in range(0, len(tokens), self._eval_chunk):
                chunk = tokens[start:start + self._eval_chunk]
                self._decode(chunk, start, want_logits=start + len(chunk) == len(tokens))
            if tokens:
                self.swaps["evaluated_again"] += 1
        self._swap_time(time.monotonic() - t0)

    def _set_threads(self, req: _Request, n_threads_batch: int) -> None:
        """The request's batch thread count from now on (kept across turns with other requests)."""
        req.threads = (self.n_threads, n_threads_batch)
        if self._ctx and not self._closed and req.threads != self._threads:
            self._native.set_n_threads(self._ctx, *req.threads)
            self._threads = req.threads

    def _check_open(self) -> None:
        if self._closed:
            raise LLMError("The model was closed", code="model_closed")

    def _stopped(self, req: _Request) -> bool:
        """Checked between tokens: the consumer left (True) or the backend is closing (raises)."""
        self._check_open()
        return req.cancelled.is_set()

    def _decode(self, tokens: list[int], start: int, want_logits: bool) -> None:
        """Evaluate ``tokens`` at positions start.. and record them as cached."""
        batch = self._batch
        n = len(tokens)
        batch.n_tokens = n
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 0
        if want_logits:
            batch.logits[n - 1] = 1
        rc = self._native.C.llama_decode(self._ctx, batch)
        if rc != 0:
            self._reset_cache()
            raise LLMError(f"llama_decode failed with code {rc}")
        self._cached.extend(tokens)

    def _rollback(self, pos: int) -> None:
        """Forget the cached tokens from position `pos` on."""
        if pos >= len(self._cached):
            return
        if self._native.kv_seq_rm(self._ctx, 0, pos, -1):
            del self._cached[pos:]
        else:
            raise LLMError("llama.cpp could not remove tokens from its cache")

    def _reset_cache(self) -> None:
        self._native.C.llama_kv_cache_clear(self._ctx)
        self._cached = []

    def _logits(self) -> np.ndarray:
        ptr = self._native.C.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise LLMError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = self._native.token_to_piece(self._model, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._native.token_to_piece(self._model, token, buf, len(buf), 0, False)
        return buf.raw[:n] if n > 0 else b""

    def _generate(self, req: _Request) -> Steps[bool]:
        """Run one request (counted in `stats` as completed); False if the consumer went away first."""
        t0 = time.monotonic()
        params = req.params
        tools, forced = _offered_tools(params)
        with self._model_lock:
            tokens = self._prompt_tokens(req.messages, tools)
        n_prompt = len(tokens)
        n_ctx = self.context_length
        if n_prompt >= n_ctx:
            raise LLMError(
                f"The conversation is {n_prompt} tokens; this model's context is {n_ctx} tokens.",
                code="context_length_exceeded",
                details={"prompt_tokens": n_prompt, "context_length": n_ctx},
            )
        if self._stopped(req):
            return False

        # Reuse the longest common prefix of what is already in the KV cache.
        common = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, n_prompt - 1)  # the last prompt token is always evaluated for logits
        if common < len(self._cached):
            if self._native.kv_seq_rm(self._ctx, 0, common, -1):
                del self._cached[common:]
            else:
                self._reset_cache()
                common = 0
        cached_tokens = common

        try:
            for start in range(common, n_prompt, self._eval_chunk):
                yield from self._checkpoint(req)
                chunk = tokens[start:start + self._eval_chunk]
                self._decode(chunk, start, want_logits=start + len(chunk) == n_prompt)
            t_prompt = time.monotonic()

            cap = self.max_output_tokens if params.max_tokens is None else max(params.max_tokens, 0)
            max_new = min(cap, n_ctx - n_prompt)
            rng = np.random.default_rng(params.seed) if params.seed is not None else self._rng
            cursor = _Cursor(self, req, max_new)
            if forced is not None:
                # tool_choice "required" or a named function: the reply is a call, whatever the model.
                cut = yield from self._tool_calls(req, cursor, rng, tools, forced or None, single=True,
                                                  opening=TOOL_CALL_OPEN + CALL_PREFIX)
                finish = "length" if cut else "tool_calls"
            else:
                finish = yield from self._free_text(req, cursor, rng, tools)
        except _Stop:
            return False
        n_gen = cursor.n_gen
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, cached_tokens=cached_tokens)
        self.stats["completed"] += 1  # before the consumer can see the end
        req.emit(Finished(finish_reason=finish, usage=usage))  # type: ignore[arg-type]
        self._log_request(n_prompt, cached_tokens, n_gen, finish, t0, t_prompt)
        return True

    def _free_text(self, req: _Request, cursor: _Cursor, rng: np.random.Generator,
                   tools: list[ToolSpec]) -> Steps[str]:
        """Sample text; with tools offered, a ``<tool_call>`` in the output switches to guided calls."""
        params = req.params
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = CallScanner(TOOL_CALL_OPEN) if tools else None
        starts: list[tuple[int, int]] = []  # (offset in the reply, KV position) of each token
        max_new = cursor.max_new
        finish = "length"
        while cursor.n_gen < max_new:
            if self._stopped(req):
                raise _Stop
            token = sample_token(self._logits(), params, rng)
            # End-of-generation tokens end the reply; so does any other control token (e.g. a
            # hallucinated <|im_start|> opening a new turn), which must never reach the client.
            if self._native.token_is_eog(self._model, token) or self._native.token_is_control(
                self._model, token
            ):
                finish = "stop"
                break
            cursor.n_gen += 1
            text = decoder.decode(self._piece(token))
            opening = None
            if scanner is not None:
                starts.append((len(scanner.text), len(self._cached)))
                text, opening = scanner.push(text)
            if text:
                req.emit(TextDelta(text))
            if cursor.n_gen < max_new:
                yield from self._checkpoint(req)
                self._decode([token], len(self._cached), want_logits=True)
            if opening is not None and scanner is not None and scanner.bare and not self._names_a_tool(
                    scanner, tools, cursor.n_gen < max_new):
                # A JSON reply that does not name one of the tools is just text.
                opening = None
                if held := scanner.reject_bare():
                    req.emit(TextDelta(held))
            if opening is not None and scanner is not None:
                # Take back the tokens of the opening as the model wrote it and continue from the
                # canonical form, so the context always reads `<tool_call>\n{"name": "`.
                offset, pos = next((o, p) for o, p in reversed(starts) if o <= opening)
                self._rollback(pos)
                lead = scanner.text[offset:opening]
                cut = yield from self._tool_calls(req, cursor, rng, tools, None, single=False,
                                                  opening=lead + TOOL_CALL_OPEN + CALL_PREFIX)
                return "length" if cut else "tool_calls"
        # An incomplete UTF-8 sequence left at a length cut is dropped rather than shown as U+FFFD.
        if scanner is not None and (held := scanner.flush()):
            req.emit(TextDelta(held))  # the start of a marker that never completed
        return finish

    def _names_a_tool(self, scanner: CallScanner, tools: list[ToolSpec], have_logits: bool) -> bool:
        """After a bare ``{"name": "``: does the model go on with one of the tool names?"""
        names = [t.name for t in tools]
        after = scanner.after_bare_opening()
        if after:
            return could_start_name(after, names)
        if not have_logits:
            return False
        token = int(np.argmax(self._logits()))
        piece = self._piece(token).decode("utf-8", "replace")
        return bool(piece) and could_start_name(piece, names)

    def _tool_calls(self, req: _Request, cursor: _Cursor, rng: np.random.Generator, tools: list[ToolSpec],
                    name: str | None, single: bool, opening: str) -> Steps[bool]:
        """Guided ``<tool_call>`` blocks: one when forced (`single`), else as many as the model writes.

        `name`: the function to call (None: the model picks among `tools`). True when the budget
        cut the first call short (or before it began): the response is incomplete.
        """
        params = req.params
        vocab = self.token_vocab()
        guide = GuidedDecoder(cursor, vocab, lambda logits: sample_token(logits, params, rng))
        t0, n0 = time.monotonic(), cursor.n_gen
        # Forced segments are a few tokens each: evaluate them with the generation threads. With the
        # batch threads, one busy core elsewhere (TTS, STT) makes each of them take up to seconds.
        self._set_threads(req, self.n_threads)
        try:
            index, cut = yield from self._guided_calls(req, guide, tools, name, single, opening)
        finally:
            self._set_threads(req, self.n_threads_batch)
        elapsed = time.monotonic() - t0
        logger.debug("%s: %d guided tool call(s)%s, %d tokens (%d sampled, %d model calls, %d squeezed by the "
                     "budget) in %.2fs (%.1f tok/s)", self.name, index, " cut by the budget" if cut else "",
                     cursor.n_gen - n0, guide.samples, guide.evaluations, guide.squeezes, elapsed,
                     (cursor.n_gen - n0) / max(elapsed, 1e-6))
        return cut

    def _guided_calls(self, req: _Request, guide: GuidedDecoder, tools: list[ToolSpec], name: str | None,
                      single: bool, opening: str) -> Steps[tuple[int, bool]]:
        """The call loop of `_tool_calls`: (calls emitted, whether the first one was cut short)."""
        vocab = guide.vocab
        index = 0
        seen: set[tuple[str, str]] = set()
        # The first call streams. Later ones are held until complete: small models tend to repeat a
        # call, or start one more than the budget allows; those are dropped and the reply ends.
        held: list[ToolCallDelta] = []
        current: dict[str, str] = {}

        def on_name(function: str) -> Callable[[str], None]:
            i = index
            first = ToolCallDelta(index=i, call_id=new_call_id(), name=function)
            current.update(name=function, args="")

            def out(delta: ToolCallDelta) -> None:
                if i == 0:
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
            yield from guide.tool_call(tools, name, on_name, opening=opening)
            squeezed = guide.squeezes > squeezes  # the budget shortened this call
            more = False
            if not single and index + 1 < MAX_CALLS_PER_RESPONSE:
                more = yield from guide.another_call(vocab.eog)  # commits this call's end first
            if not more:
                guide.finish()  # the call's last text: counted and shown, never evaluated
            if index == 0 and (guide.truncated or not current):
                return 0 if not current else 1, True
            key = (current.get("name", ""), current.get("args", ""))
            if index > 0:
                if key in seen or guide.truncated or squeezed:
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

    def _log_request(self, n_prompt: int, cached: int, n_gen: int, finish: str, t0: float,
                     t_prompt: float) -> None:
        t_end = time.monotonic()
        logger.debug(
            "%s: prompt %d tok (%d cached) in %.2fs, %d tok generated in %.2fs (%.1f tok/s), %s",
            self.name, n_prompt, cached, t_prompt - t0, n_gen, t_end - t_prompt,
            n_gen / max(t_end - t_prompt, 1e-6), finish,
        )
