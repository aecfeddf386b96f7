"""Our schema-guided tool-call decoder against llguidance, on the same model, prompt and sampler.

Issue 13 asks whether an existing structured-decoding engine (llguidance, the one llama.cpp uses)
should replace ``tool_calling.GuidedDecoder``: the same guarantees with less code and the same or
better speed. This bench measures both on the real model so the question is settled by figures.

For every case (the five tools of ``bench/tool_cases.py`` with their one-call requests, and the
``book_table`` schema of ``bench/tool_decoding.py`` with requests of its own) the tool call's
arguments are decoded greedily three ways, after the same prompt (all six tools offered, the chat
template the server uses):

* ``ours/prod``: the production path, a forced call through ``LlamaCppBackend.stream`` with
  ``tool_choice`` naming the function and the server's budget (its debug line gives tokens /
  sampled / model calls);
* ``ours``: ``GuidedDecoder.tool_call`` over a thin ``LanguageModel`` adapter on the same context
  (the same code as production, with timing hooks around the model);
* ``llguidance``: an ``LLMatcher`` built from the tool's schema (``grammar_from_json_schema``,
  compact separators, no extra properties, as our decoder writes) constraining the same model
  after the same ``<tool_call>\\n{"name": "...", "arguments": `` opening; its fast-forward tokens
  are evaluated with the sampled token in one model call, like our forced runs.

The two direct runs get ``FREE_BUDGET`` (128) output tokens: llguidance lets a number or string run
on (``0.000000...``) until the budget ends, which would otherwise take the rest of the context.

Reported per engine: engine time per decision (everything that is not the model: mask, sampling,
forcing; for llguidance also the bare ``compute mask`` call), median and p95; time to a complete
call (after the prompt); output tokens, sampled tokens and model evaluations per call; whether the
arguments parse and validate against the schema (``jsonschema``); whether both engines wrote the
same arguments; and, under tight budgets (``max_tokens`` 12, 20, 28 for the whole call, markup
included), whether each still ends with valid JSON. Also the lines of code each approach needs,
and llguidance's installed size and import time. Prints one table and writes
bench/results/guided_engines.json.

llguidance is not a project dependency; install it into the venv first:

    .venv/bin/pip install llguidance
    .venv/bin/python bench/guided_engines.py [--models qwen2.5-1.5b] [-n 3] [--threads 1]

``-n``: requests per tool (at most 4). The default run takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.metadata
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openrealtime.backends import tool_calling
from openrealtime.backends.gguf import ModelError, ensure_model
from openrealtime.backends.llamacpp import LlamaCppBackend, sample_token
from openrealtime.backends.llm import ChatMessage, GenerationParams, ToolSpec
from openrealtime.backends.tool_calling import CALL_PREFIX, TOOL_CALL_OPEN, GuidedDecoder, TokenVocab, drive
from openrealtime.config import Settings

try:
    import llguidance as llg
except ImportError:  # reported in main()
    llg = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tool_cases import CASES as SUITE  # noqa: E402
from bench.tool_cases import TOOLS  # noqa: E402
from bench.tool_decoding import BOOKING, collect_call  # noqa: E402

SYSTEM = "You are a helpful assistant."
BOOKING_REQUESTS = ["Book a table for four at Chez Paul on Friday at 8pm, by the window.",
                    "Reserve a table for 2 at Luigi's tomorrow at 7pm, our budget is 80 euros.",
                    "I need a table for six people at Sakura on Saturday at 19:00.",
                    "Get us a table at The Ivy next Tuesday at noon for three, quiet corner please."]
BUDGETS = (12, 20, 28)
# The budget of the untight direct runs: these calls need < 70 tokens; an engine that lets a value run
# on (llguidance's numbers and strings are unbounded) is cut here instead of at the context's end.
FREE_BUDGET = 128
GREEDY = GenerationParams(temperature=0.0)


@dataclass(frozen=True)
class Case:
    tool: ToolSpec
    request: str


def all_tools() -> list[ToolSpec]:
    return [ToolSpec(t["name"], t["description"], t["parameters"]) for t in TOOLS] + [BOOKING]


def cases(per_tool: int) -> list[Case]:
    tools = {t.name: t for t in all_tools()}
    out: list[Case] = []
    for name in tools:
        if name == BOOKING.name:
            requests = BOOKING_REQUESTS
        else:
            requests = [c.request for c in SUITE if len(c.calls) == 1 and c.calls[0].name == name
                        and c.prior_call is None]
        out += [Case(tools[name], r) for r in requests[:per_tool]]
    return out


def opening(tool: ToolSpec) -> str:
    """The call markup before the arguments, as our decoder forces it for a named function."""
    return TOOL_CALL_OPEN + CALL_PREFIX + tool.name + '", "arguments": '


# --------------------------------------------------------------------------- the model, shared


class DirectModel:
    """Sequence 0 of the backend's context, driven outside its scheduler (``LanguageModel``).

    Keeps the prompt's KV cache between runs (only the differing suffix is evaluated again), and
    records for each run: model evaluations and their time, and the moments the decoder read the
    logits (one per decision), to separate engine time from model time.
    """

    def __init__(self, llm: LlamaCppBackend) -> None:
        self.llm = llm
        self.cached: list[int] = []
        self.prompt_logits: np.ndarray | None = None
        self._logits: np.ndarray | None = None
        self.max_new = 0
        self.n_gen = 0
        self.evals = 0
        self.model_s = 0.0
        self.marks: list[tuple[float, float]] = []  # (wall clock, model seconds so far) per decision
        native = llm._native
        native.set_n_threads(llm._ctx, llm.n_threads_batch, llm.n_threads_batch)  # a lone request
        llm._threads = (llm.n_threads_batch, llm.n_threads_batch)

    def _decode(self, tokens: list[int], logits: bool = True) -> None:
        chunk = self.llm._eval_chunk
        for start in range(0, len(tokens), chunk):
            self.llm._decode_alone(tokens[start:start + chunk], len(self.cached))
            self.cached += tokens[start:start + chunk]
        if logits and tokens:
            self._logits = self.llm._last_logits()

    def start(self, prompt: list[int], budget: int) -> None:
        """Reset to `prompt` (evaluated, reusing the cached prefix) with `budget` output tokens."""
        common = 0
        for a, b in zip(self.cached, prompt, strict=False):
            if a != b:
                break
            common += 1
        if common == len(prompt) and self.prompt_logits is not None and len(self.cached) == len(prompt):
            self._logits = self.prompt_logits
        else:
            common = min(common, len(prompt) - 1)
            if not self.llm._native.kv_seq_rm(self.llm._ctx, 0, common, -1):
                raise RuntimeError("kv_seq_rm failed")
            del self.cached[common:]
            self._decode(prompt[common:])
            self.prompt_logits = self._logits
        self.prompt = list(prompt)
        self.max_new = min(budget, self.llm.context_length - len(prompt))
        self.n_gen = self.evals = 0
        self.model_s = 0.0
        self.marks = []

    def rewind(self) -> None:
        """Forget the output of the last run (keep the prompt)."""
        self.llm._native.kv_seq_rm(self.llm._ctx, 0, len(self.prompt), -1)
        del self.cached[len(self.prompt):]
        self._logits = self.prompt_logits

    # LanguageModel
    def tokenize(self, text: str) -> list[int]:
        return self.llm._tokenize(text, add_bos=False)

    def room(self) -> int:
        return self.max_new - self.n_gen

    def evaluate(self, tokens: list[int]) -> Iterator[None]:
        if len(tokens) > self.room():
            raise RuntimeError("over the token budget")
        t0 = time.perf_counter()
        self._decode(tokens)
        self.model_s += time.perf_counter() - t0
        self.evals += 1
        self.n_gen += len(tokens)
        yield from ()

    def spend(self, n: int) -> None:
        if not 0 <= n <= self.room():
            raise RuntimeError("over the token budget")
        self.n_gen += n

    def logits(self) -> np.ndarray:
        self.marks.append((time.perf_counter(), self.model_s))
        assert self._logits is not None
        return self._logits


@dataclass
class Run:
    engine: str
    tool: str
    request: str
    budget: int | None
    arguments: str = ""
    finish: str = ""
    tokens: int = 0
    sampled: int = 0
    model_calls: int = 0
    seconds: float = 0.0  # decoding, after the prompt
    engine_ms: list[float] = field(default_factory=list)  # non-model time per decision
    mask_ms: list[float] = field(default_factory=list)  # llguidance: the compute-mask call alone
    setup_ms: float = 0.0  # llguidance: building the matcher (grammar compile)
    parses: bool = False
    valid: bool = False
    detail: str = ""


def engine_times(lm: DirectModel, t_start: float, model_start: float, t_end: float) -> list[float]:
    """Engine (non-model) milliseconds per segment between decisions, from the adapter's marks."""
    points = [(t_start, model_start), *lm.marks, (t_end, lm.model_s)]
    return [((t1 - t0) - (m1 - m0)) * 1000 for (t0, m0), (t1, m1) in itertools.pairwise(points)]


def check(run: Run, schema: dict[str, Any]) -> None:
    try:
        value = json.loads(run.arguments)
    except ValueError:
        return
    run.parses = True
    try:
        import jsonschema
    except ImportError:
        run.valid = isinstance(value, dict) and all(k in value for k in schema.get("required", []))
        return
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]
    run.valid = not errors
    run.detail = "; ".join(errors)[:200]


# --------------------------------------------------------------------------- ours


def ours_call(lm: DirectModel, vocab: TokenVocab, case: Case, prompt: list[int], budget: int) -> Run:
    lm.start(prompt, budget)
    rng = np.random.default_rng(0)
    guide = GuidedDecoder(lm, vocab, lambda logits: sample_token(logits, GREEDY, rng))
    parts: list[str] = []
    named: list[str] = []

    def on_name(name: str) -> Callable[[str], None]:
        named.append(name)
        return parts.append

    t0, m0 = time.perf_counter(), lm.model_s
    drive(guide.tool_call([case.tool], case.tool.name, on_name))
    guide.finish()
    t1 = time.perf_counter()
    run = Run("ours", case.tool.name, case.request, budget, "".join(parts),
              "length" if guide.truncated or not named else "tool_calls", lm.n_gen, guide.samples,
              guide.evaluations, t1 - t0, engine_times(lm, t0, m0, t1))
    lm.rewind()
    return run


# --------------------------------------------------------------------------- llguidance glue
# Everything llguidance needs to replace GuidedDecoder in the backend (counted as its glue).


def llg_tokenizer(llm: LlamaCppBackend, vocab: TokenVocab) -> Any:
    """An LLTokenizer over the model's vocabulary: token bytes (control tokens marked special with
    a 0xFF prefix, so that no grammar text matches them) and llama.cpp's tokenizer."""
    native, model = llm._native, llm._model
    special = [t for t in range(vocab.size) if native.token_is_control(model, t) or native.token_is_eog(model, t)]
    tokens = list(vocab.pieces)
    for t in special:
        tokens[t] = b"\xff" + llm._token_text(t).encode()

    class Wrapped:
        eos_token_id = int(vocab.eog[0])
        bos_token_id = None

        def __init__(self) -> None:
            self.tokens = tokens
            self.special_token_ids = special

        def __call__(self, text: bytes) -> list[int]:
            return llm._tokenize(text.decode("utf-8", "replace"), add_bos=False)

    return llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()), eos_token=[int(t) for t in vocab.eog])


def _closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object (our decoder writes only the
    listed properties; JSON Schema would allow any others)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def llg_grammar(tool: ToolSpec, max_tokens: int | None = None) -> str:
    """The arguments grammar, written like ours: ``{"a": 1, "b": [2, 3]}``; unknown keywords ignored."""
    grammar = llg.LLMatcher.grammar_from_json_schema(
        _closed(tool.parameters or {"type": "object"}),
        overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True})
    if max_tokens is not None:
        top = json.loads(grammar)
        top["max_tokens"] = max(max_tokens, 0)  # llguidance's own budget: it stops there, wherever it is
        grammar = json.dumps(top)
    return grammar


def llg_call(lm: DirectModel, tokenizer: Any, vocab: TokenVocab, case: Case, prompt: list[int],
             budget: int) -> Run:
    lm.start(prompt, budget)
    rng = np.random.default_rng(0)
    t0, m0 = time.perf_counter(), lm.model_s
    head = lm.tokenize(opening(case.tool))
    matcher = llg.LLMatcher(tokenizer, llg_grammar(case.tool, lm.room() - len(head)), log_level=0)
    setup_ms = (time.perf_counter() - t0) * 1000
    if matcher.is_error():
        raise RuntimeError(matcher.get_error())
    mask = np.zeros((vocab.size + 31) // 32, dtype=np.int32)
    eos = set(int(t) for t in vocab.eog)
    pending, out, masks, sampled = head[:lm.room()], [], [], 0
    while len(pending) < lm.room() + 1:
        forced = matcher.compute_ff_tokens()  # what the grammar fixes: evaluated with the last pick
        if forced:
            matcher.consume_tokens(forced)
            pending += forced
            out += forced
        if matcher.is_stopped() or len(pending) >= lm.room():
            break
        drive(lm.evaluate(pending))
        pending = []
        t = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        masks.append((time.perf_counter() - t) * 1000)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab.size].view(bool)
        logits = np.where(allowed, lm.logits(), -np.inf)
        tok = sample_token(logits, GREEDY, rng)
        sampled += 1
        if tok in eos:
            break
        matcher.consume_token(tok)
        pending.append(tok)
        out.append(tok)
    keep = min(len(pending), lm.room())
    lm.spend(keep)  # the end of the call: counted, never evaluated (as ours)
    if keep < len(pending):
        out = out[:len(out) - (len(pending) - keep)]
    t1 = time.perf_counter()
    complete = matcher.is_accepting() and not matcher.is_error() and keep == len(pending)
    run = Run("llguidance", case.tool.name, case.request, budget, tokenizer.decode_str(out),
              "tool_calls" if complete else "length", lm.n_gen, sampled, lm.evals, t1 - t0,
              engine_times(lm, t0, m0, t1), masks, setup_ms, detail=matcher.stop_reason())
    lm.rewind()
    return run


# --------------------------------------------------------------------------- production path


class _Stats(logging.Handler):
    """Reads the backend's per-request debug line for sampled-token and evaluation counts."""

    pattern = re.compile(r"(\d+) tokens \((\d+) sampled, (\d+) model calls")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: tuple[int, ...] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match:
            self.last = tuple(int(x) for x in match.groups())


async def prod_call(llm: LlamaCppBackend, stats: _Stats, case: Case, tools: list[ToolSpec],
                    budget: int | None) -> Run:
    messages = [ChatMessage("system", SYSTEM), ChatMessage("user", case.request)]
    params = GenerationParams(temperature=0.0, tools=tools, tool_choice=case.tool.name, max_tokens=budget)
    stats.last = None
    t0 = time.perf_counter()
    args, finished = await collect_call(llm, messages, params)
    run = Run("ours/prod", case.tool.name, case.request, budget, args, finished.finish_reason,
              finished.usage.completion_tokens, seconds=time.perf_counter() - t0)
    if stats.last:
        run.sampled, run.model_calls = stats.last[1], stats.last[2]
    return run


# --------------------------------------------------------------------------- code size, package


def code_lines(path: Path, names: set[str]) -> tuple[int, int]:
    """(lines, code lines without blanks, comments and docstrings) of the named top-level
    definitions and assignments in `path`."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    total = code = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        else:
            continue
        if name not in names:
            continue
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        end = node.end_lineno or node.lineno
        docs: set[int] = set()
        for sub in ast.walk(node):
            body = getattr(sub, "body", None)
            if isinstance(sub, ast.FunctionDef | ast.ClassDef) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docs.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
        for i in range(start, end + 1):
            text = lines[i - 1].strip()
            total += 1
            if text and not text.startswith("#") and i not in docs:
                code += 1
    return total, code


# What GuidedDecoder needs from tool_calling.py (the prompt, parsing and scanning parts are not
# counted: llguidance would need them as well).
OURS_NAMES = {
    "MAX_STRING_TOKENS", "MAX_NUMBER_CHARS", "DEFAULT_MAX_ITEMS", "MAX_DEPTH", "SMALL_INT_RANGE",
    "MAX_DELTA_CHARS", "BUDGET_MARGIN", "_CHUNK", "_MINIMAL_DEPTH", "_HUGE", "_VALUE_END_CHARS",
    "TokenVocab", "_T", "Steps", "Sink", "drive", "LanguageModel", "Sampler", "_Cut", "_Lazy", "Text", "_size",
    "_pieces", "_repeat", "_prefix", "_Seg", "_Minimal", "_Frame", "_ObjectFrame", "_ArrayFrame",
    "_StringFrame", "_NumberFrame", "GuidedDecoder", "schema_type", "resolve_ref", "resolve_schema",
    "object_keys", "array_items", "call_arguments", "minimal_number", "minimal_value", "_int", "_is_num",
    "_INT_PREFIX", "_NUM_PREFIX", "_INT_FULL", "_NUM_FULL", "_number_prefix_ok", "_number_complete",
    "_complete_number",
}
GLUE_NAMES = {"llg_tokenizer", "_closed", "llg_grammar", "llg_call"}


def package_facts() -> dict[str, Any]:
    dist = importlib.metadata.distribution("llguidance")
    size = sum(f.size or 0 for f in dist.files or [])
    probe = "import time; t = time.perf_counter(); import llguidance; print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(3)]
    return {"version": dist.version, "installed_mb": round(size / 1e6, 1), "requires": dist.requires or [],
            "import_ms": round(min(times) * 1000, 1)}


# --------------------------------------------------------------------------- the bench


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def fmt(value: float | None, width: int) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def summary(runs: list[Run]) -> dict[str, Any]:
    n = len(runs)
    engine = [x for r in runs for x in r.engine_ms]
    mask = [x for r in runs for x in r.mask_ms]
    return {"calls": n, "valid": sum(r.valid for r in runs), "parses": sum(r.parses for r in runs),
            "cut": sum(r.finish == "length" for r in runs),
            "tokens": sum(r.tokens for r in runs) / n, "sampled": sum(r.sampled for r in runs) / n,
            "model_calls": sum(r.model_calls for r in runs) / n,
            "engine_ms_median": statistics.median(engine) if engine else None,
            "engine_ms_p95": pct(engine, 95) if engine else None,
            "mask_ms_median": statistics.median(mask) if mask else None,
            "mask_ms_p95": pct(mask, 95) if mask else None,
            "ms_per_call": statistics.median(r.seconds for r in runs) * 1000}


async def bench(name: str, per_tool: int, stats: _Stats, threads: int) -> dict[str, Any]:
    path = ensure_model(name, Settings().model_cache_dir, progress=False)
    llm = await asyncio.to_thread(LlamaCppBackend, path, n_ctx=2048, name=name, n_parallel=1,
                                  n_threads=threads)
    tools = all_tools()
    todo = cases(per_tool)
    by_tool = {t.name: t for t in tools}
    budget_cases = [next(c for c in todo if c.tool.name == t.name) for t in tools]
    runs: list[Run] = []
    try:
        # 1. The production path (the backend's scheduler and its own KV cache bookkeeping).
        await prod_call(llm, stats, todo[0], tools, None)  # warm-up: token classes, tools prompt cached
        for case in todo:
            runs.append(await prod_call(llm, stats, case, tools, None))
        for budget in BUDGETS:
            for case in budget_cases:
                runs.append(await prod_call(llm, stats, case, tools, budget))

        # 2. Both engines over the same direct adapter (nothing else uses the model from here on).
        def direct() -> list[Run]:
            llm._reset_cache()
            vocab = llm.token_vocab()
            t0 = time.perf_counter()
            tokenizer = llg_tokenizer(llm, vocab)
            setup["llg_tokenizer_s"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            llm._vocab = None
            vocab = llm.token_vocab()  # pieces from llama.cpp + token classes (llguidance reuses the pieces)
            setup["our_vocab_s"] = round(time.perf_counter() - t0, 3)
            lm = DirectModel(llm)
            out: list[Run] = []
            warm = todo[0]
            prompt = llm._prompt_tokens([ChatMessage("system", SYSTEM), ChatMessage("user", warm.request)], tools)
            ours_call(lm, vocab, warm, prompt, FREE_BUDGET)
            llg_call(lm, tokenizer, vocab, warm, prompt, FREE_BUDGET)
            for case in todo:
                prompt = llm._prompt_tokens([ChatMessage("system", SYSTEM), ChatMessage("user", case.request)], tools)
                out.append(ours_call(lm, vocab, case, prompt, FREE_BUDGET))
                out.append(llg_call(lm, tokenizer, vocab, case, prompt, FREE_BUDGET))
                for budget in BUDGETS if case in budget_cases else ():
                    out.append(ours_call(lm, vocab, case, prompt, budget))
                    out.append(llg_call(lm, tokenizer, vocab, case, prompt, budget))
            llm._reset_cache()
            return out

        setup: dict[str, Any] = {}
        runs += await llm._compute.run(direct)
    finally:
        await llm.close()
    for run in runs:
        check(run, by_tool[run.tool].parameters or {})
    return {"model": name, "setup": setup, "runs": runs}


def report(result: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    runs: list[Run] = result["runs"]
    free = [r for r in runs if r.budget not in BUDGETS]
    tight = [r for r in runs if r.budget in BUDGETS]
    key = lambda r: (r.tool, r.request)  # noqa: E731
    args = {(r.engine, *key(r)): r.arguments for r in free}
    same = {k: args.get(("ours", *k)) == args.get(("llguidance", *k)) for k in {key(r) for r in free}}
    prod_same = {k: args.get(("ours", *k)) == args.get(("ours/prod", *k)) for k in same}
    engines = ["ours/prod", "ours", "llguidance"]
    rows: dict[str, Any] = {}
    head = (f"{'tool':22} {'engine':10} {'calls':>5} {'valid':>5} {'cut':>3} {'tok':>5} {'sampl':>5} {'evals':>5} "
            f"{'eng ms p50':>10} {'p95':>6} {'mask p50':>8} {'p95':>6} {'ms/call':>7} {'same':>5}")
    print(f"model {result['model']}: greedy, arguments after the same prompt (budget: ours/prod the server's, "
          f"direct runs {FREE_BUDGET}); cut = finish 'length'; eng ms = non-model time per decision; "
          f"same = ours and llguidance wrote identical arguments")
    print(head)
    print("-" * len(head))
    tool_names = [*dict.fromkeys(r.tool for r in free), "ALL"]
    for tool in tool_names:
        for engine in engines:
            sel = [r for r in free if r.engine == engine and tool in (r.tool, "ALL")]
            if not sel:
                continue
            s = summary(sel)
            rows[f"{tool}/{engine}"] = s
            ks = [key(r) for r in sel]
            match = f"{sum(same[k] for k in ks)}/{len(ks)}" if engine != "ours/prod" else \
                f"{sum(prod_same[k] for k in ks)}/{len(ks)}*"
            print(f"{tool:22} {engine:10} {s['calls']:5d} {s['valid']:5d} {s['cut']:3d} {s['tokens']:5.1f} "
                  f"{s['sampled']:5.1f} {s['model_calls']:5.1f} {fmt(s['engine_ms_median'], 10)} "
                  f"{fmt(s['engine_ms_p95'], 6)} {fmt(s['mask_ms_median'], 8)} {fmt(s['mask_ms_p95'], 6)} "
                  f"{s['ms_per_call']:7.0f} {match:>5}")
    print("-" * len(head))
    budget_rows: dict[str, Any] = {}
    for budget in BUDGETS:
        parts = []
        for engine in engines:
            sel = [r for r in tight if r.engine == engine and r.budget == budget]
            budget_rows[f"{budget}/{engine}"] = {
                "calls": len(sel), "valid_json": sum(r.valid for r in sel),
                "finish_length": sum(r.finish == "length" for r in sel),
                "invalid_not_flagged": sum(not r.valid and r.finish != "length" for r in sel),
                "tokens_max": max((r.tokens for r in sel), default=0)}
            b = budget_rows[f"{budget}/{engine}"]
            parts.append(f"{engine} valid {b['valid_json']}/{b['calls']}, length {b['finish_length']}, "
                         f"invalid+unflagged {b['invalid_not_flagged']}")
        print(f"max_tokens {budget:2d}: " + "; ".join(parts))
    ours_loc = code_lines(Path(tool_calling.__file__), OURS_NAMES)
    glue_loc = code_lines(Path(__file__), GLUE_NAMES)
    setup = result["setup"]
    print(f"code: ours {ours_loc[1]} code lines ({ours_loc[0]} with docs); llguidance glue {glue_loc[1]} "
          f"({glue_loc[0]}) + the {facts['installed_mb']} MB llguidance {facts['version']} wheel "
          f"(deps: {', '.join(facts['requires']) or 'none'}), import {facts['import_ms']} ms")
    print(f"setup per model: our TokenVocab {setup['our_vocab_s']} s, LLTokenizer {setup['llg_tokenizer_s']} s; "
          f"llguidance matcher per call (grammar compile) median "
          f"{statistics.median(r.setup_ms for r in free if r.engine == 'llguidance'):.1f} ms")
    print("* ours/prod: same column = production path wrote the same arguments as `ours` over the adapter; "
          "its ms/call includes the (cached-prefix) prompt")
    return {"model": result["model"], "summary": rows, "budgets": budget_rows, "setup": setup,
            "code_lines": {"ours": {"lines": ours_loc[0], "code": ours_loc[1]},
                           "llguidance_glue": {"lines": glue_loc[0], "code": glue_loc[1]}},
            "same_arguments": sum(same.values()), "compared": len(same),
            "prod_matches_adapter": sum(prod_same.values()),
            "runs": [vars(r) for r in runs]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-1.5b"])
    parser.add_argument("-n", type=int, default=3, help="requests per tool (1-4)")
    parser.add_argument("--threads", type=int, default=0,
                        help="llama.cpp threads (0: the backend's default; 1 when other work keeps a core busy)")
    args = parser.parse_args()
    if llg is None:
        sys.exit("llguidance is not installed: .venv/bin/pip install llguidance")
    stats = _Stats()
    logger = logging.getLogger("openrealtime.backends.llamacpp")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(stats)
    facts = package_facts()
    load = os.getloadavg()[0]
    out: dict[str, Any] = {"llguidance": facts, "threads": args.threads, "load_before": load, "models": []}
    for name in args.models:
        try:
            result = await bench(name, max(1, min(args.n, 4)), stats, args.threads)
        except ModelError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        out["models"].append(report(result, facts))
    out["load_after"] = os.getloadavg()[0]
    print(f"load average (1 min) {load:.1f} before, {out['load_after']:.1f} after; threads {args.threads or 'default'}")
    dest = ROOT / "bench" / "results" / "guided_engines.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
