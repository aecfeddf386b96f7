"""Function calling for local models: prompt rendering, output parsing and schema-guided decoding.

Prompt convention
-----------------
Tools reach the model through its own chat template when the template supports them (it uses a
``tools`` variable and the ``<tool_call>`` convention, as Qwen2.5's does). Otherwise (SmolLM2,
plain ChatML) the same information is written into the system prompt in a generic format
(:func:`generic_tools_prompt`), previous calls are rendered as ``<tool_call>`` blocks in the
assistant turn and results as ``<tool_response>`` blocks in a user turn. Either way the model calls
a function by writing::

    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Paris"}}
    </tool_call>

Schema-guided decoding
----------------------
llama.cpp's grammar sampler is not reachable through the ctypes bindings, so :class:`GuidedDecoder`
steers the model itself. Everything the schema fixes (braces, property names, colons, commas,
quotes) is *forced*: appended to the context without sampling. The model only chooses:

* string contents: sampled among tokens that cannot break the string (no quote, backslash or
  control character, whole UTF-8 characters); any token that starts with ``"`` closes it;
* numbers: digit tokens checked against the JSON number grammar, bounded length, closed by a token
  that starts with ``,`` ``}`` ``]`` or whitespace (or when the bound is reached);
* literals (``enum``, booleans, which function to call, which optional property comes next, whether
  an array goes on): a walk down the token trie of the allowed texts, where the model's own
  distribution restricted to the branches picks at each fork;

so the output is always valid JSON that matches the schema, and every loop is bounded, so it always
terminates, even on a 135M-parameter model. If the token budget (``max_output_tokens`` or the
context) runs out mid-call, the rest is completed with minimal valid values without the model.

Supported JSON-Schema subset: ``type`` object / string / number / integer / boolean / array /
null (a list of types uses its first non-null entry), ``properties``, ``required`` (always
present; optional properties are included when the model wants them), ``enum``, ``const``,
``items``, ``minItems`` / ``maxItems``, ``minLength`` / ``maxLength``, ``minimum`` >= 0 (no sign)
and small integer ``minimum``..``maximum`` ranges (chosen like an enum), local ``$ref`` into
``$defs`` / ``definitions``, and ``anyOf`` / ``oneOf`` (the first alternative). Other keywords
(``pattern``, ``format``, ``uniqueItems``, ``additionalProperties`` beyond the listed properties,
general numeric bounds, ...) are ignored: the output is still valid JSON and follows the rest.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .llm import ChatMessage, ToolSpec

log = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
# What follows the marker up to the function name, in every call we decode.
CALL_PREFIX = '\n{"name": "'

# Bounds that make every guided value terminate.
MAX_STRING_TOKENS = 64
MAX_NUMBER_CHARS = 15
DEFAULT_MAX_ITEMS = 8
MAX_DEPTH = 8
MAX_CALLS_PER_RESPONSE = 8
# Integer ranges up to this size are chosen like an enum (so minimum/maximum hold).
SMALL_INT_RANGE = 64

_VALUE_END_CHARS = frozenset(",}] \t\r\n")


def new_call_id() -> str:
    """OpenAI-looking function call ids (``call_`` and 16 random characters)."""
    return "call_" + secrets.token_urlsafe(12)[:16]


# --------------------------------------------------------------------------- prompt side


def tool_schema(tool: ToolSpec) -> dict[str, Any]:
    """A tool in the chat-completions shape chat templates expect."""
    return tool.openai_schema()


def generic_tools_prompt(tools: Sequence[ToolSpec]) -> str:
    """The tool section added to the system prompt of models whose template knows no tools."""
    listing = "\n".join(json.dumps(tool_schema(t), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\n"
        "You can call functions to help with the user's request. They are listed, one JSON "
        f"signature per line, between <tools> and </tools>:\n<tools>\n{listing}\n</tools>\n\n"
        f"To call a function, reply with a JSON object holding its name and arguments between "
        f"{TOOL_CALL_OPEN} and {TOOL_CALL_CLOSE} tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}\n'
        f"The result comes back between {TOOL_RESPONSE_OPEN} and {TOOL_RESPONSE_CLOSE} tags."
    )


def tool_call_text(name: str, arguments: str) -> str:
    """How a call reads in the prompt (arguments re-serialised when they are valid JSON)."""
    try:
        args = json.dumps(json.loads(arguments), ensure_ascii=False) if arguments.strip() else "{}"
    except ValueError:
        args = json.dumps(arguments, ensure_ascii=False)
    call = f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}'
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def could_start_name(text: str, names: Iterable[str]) -> bool:
    """Whether `text` (what follows ``{"name": "``) can be the start of one of the function names."""
    quoted = [json.dumps(n, ensure_ascii=False)[1:] for n in names]  # name + closing quote
    return any(q.startswith(text) or (text.startswith(q) and text) for q in quoted)


def template_supports_tools(source: str) -> bool:
    """Whether a chat template renders ``tools`` itself, in the ``<tool_call>`` convention."""
    return bool(re.search(r"\btools\b", source)) and TOOL_CALL_OPEN in source


def _arguments_value(arguments: str) -> Any:
    """Templates serialise call arguments with ``tojson``: hand them a parsed object when we can."""
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return arguments


def template_messages(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], native: bool
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and the ``tools`` variable) to render with a chat template.

    ``native``: the template handles tools, assistant ``tool_calls`` and ``tool`` turns itself.
    Otherwise they are rewritten into plain system / user / assistant turns (see module doc).
    """
    if native:
        out = []
        for m in messages:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": _arguments_value(c.arguments)}}
                    for c in m.tool_calls
                ]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out, [tool_schema(t) for t in tools] or None

    out = []
    for m in messages:
        if m.role == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{m.content}\n{TOOL_RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif m.role == "assistant" and m.tool_calls:
            calls = "\n".join(tool_call_text(c.name, c.arguments) for c in m.tool_calls)
            out.append({"role": "assistant", "content": f"{m.content}\n{calls}" if m.content else calls})
        else:
            out.append({"role": m.role, "content": m.content})
    for d in out:
        d.pop("_tool_results", None)
    if tools:
        section = generic_tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{section}" if out[0]["content"] else section
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, None


# --------------------------------------------------------------------------- output parsing


@dataclass(slots=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


@dataclass(slots=True)
class ParsedOutput:
    text: str  # everything outside well-formed tool-call blocks
    calls: list[ParsedToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S)


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split free model output into text and ``<tool_call>`` JSON calls.

    For unconstrained output (e.g. a remote server that returns raw text): a block that is not a
    JSON object with a string ``name`` and object ``arguments`` (``parameters`` is accepted too)
    is kept as text and reported in ``errors``; nothing raises.
    """
    result = ParsedOutput(text="")
    pieces: list[str] = []
    pos = 0
    for match in _BLOCK.finditer(text):
        pieces.append(text[pos:match.start()])
        pos = match.end()
        body = match.group(1).strip()
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
                raise ValueError("a tool call needs a string 'name'")
            args = data.get("arguments", data.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args) if args.strip() else {}
            if not isinstance(args, dict):
                raise ValueError("tool call 'arguments' must be a JSON object")
        except ValueError as exc:
            result.errors.append(f"malformed tool call {body[:80]!r}: {exc}")
            pieces.append(match.group(0))
            continue
        result.calls.append(ParsedToolCall(data["name"], json.dumps(args, ensure_ascii=False)))
    pieces.append(text[pos:])
    result.text = "".join(pieces)
    return result


# How a call opens when the model forgets the tag (small Qwen models often do), whitespace removed.
_BARE_OPENINGS = ('{"name":"', '```json{"name":"', '```{"name":"')
_BARE_OPENING = re.compile(r'\s*(?:```(?:json)?\s*)?\{\s*"name"\s*:\s*"')


class CallScanner:
    """Finds where a tool call starts in streamed model text, holding back what could be its start.

    A call opens with the ``<tool_call>`` marker anywhere, or (``bare_json``) with a bare JSON call
    object ``{"name": "`` (optionally in a code fence) at the very start of the reply.
    """

    def __init__(self, marker: str = TOOL_CALL_OPEN, bare_json: bool = True):
        self.marker = marker
        self.bare_json = bare_json
        self.text = ""  # the whole reply so far
        self.shown = 0  # how much of it was released as text
        self.bare = False  # the last opening found was a bare JSON object (no marker)

    def push(self, piece: str) -> tuple[str, int | None]:
        """(text to show now, None), or (text to show, offset in the reply where a call opens)."""
        self.text += piece
        i = self.text.find(self.marker, self.shown)
        if i >= 0:
            self.bare = False
            return self._show(i), i
        if self.bare_json and self.shown == 0:
            squeezed = "".join(self.text.split())
            if any(squeezed.startswith(t) for t in _BARE_OPENINGS):
                self.bare = True
                return "", len(self.text) - len(self.text.lstrip())
            if any(t.startswith(squeezed) for t in _BARE_OPENINGS):
                return "", None  # still undecided
        rest = self.text[self.shown:]
        keep = 0
        for k in range(min(len(rest), len(self.marker) - 1), 0, -1):
            if self.marker.startswith(rest[-k:]):
                keep = k
                break
        return self._show(len(self.text) - keep), None

    def flush(self) -> str:
        """Whatever was held back (the reply ended without completing a call opening)."""
        return self._show(len(self.text))

    def after_bare_opening(self) -> str:
        """The text after ``{"name": "`` of a bare opening (the start of the function name)."""
        match = _BARE_OPENING.match(self.text)
        return self.text[match.end():] if match else ""

    def reject_bare(self) -> str:
        """The bare opening was not a call after all: stop looking for one; returns the held text."""
        self.bare_json = False
        self.bare = False
        return self.flush()

    def _show(self, upto: int) -> str:
        out = self.text[self.shown:upto]
        self.shown = max(self.shown, upto)
        return out


# --------------------------------------------------------------------------- token classes


class TokenVocab:
    """Per-model token classes for guided decoding, computed once from every token's bytes."""

    def __init__(self, pieces: Sequence[bytes], unusable: Iterable[int] = (), eog: Iterable[int] = ()):
        n = len(pieces)
        self.size = n
        self.pieces = list(pieces)
        bad = np.zeros(n, dtype=bool)
        bad[list(unusable)] = True
        string_safe, quote, terminator, number, any_text = [], [], [], [], []
        self.text: list[str | None] = [None] * n
        number_chars = set("0123456789.-")
        for tok, piece in enumerate(self.pieces):
            if bad[tok] or not piece:
                continue
            try:
                s = piece.decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.text[tok] = s
            any_text.append(tok)
            if s[0] == '"':
                quote.append(tok)
            elif s[0] in _VALUE_END_CHARS:
                terminator.append(tok)
            if '"' not in s and "\\" not in s and all(ord(c) >= 0x20 for c in s):
                string_safe.append(tok)
            if all(c in number_chars for c in s):
                number.append(tok)
        ids = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
        self.string_safe = ids(string_safe)
        self.quote = ids(quote)  # tokens that close a string
        self.terminator = ids(terminator)  # tokens that end a number / literal
        self.number = ids(number)
        self.eog = ids(sorted(set(eog)))
        self.string_or_quote = np.concatenate([self.string_safe, self.quote])
        self._quote_set = frozenset(quote)
        self._terminator_set = frozenset(terminator)

    def is_quote(self, tok: int) -> bool:
        return tok in self._quote_set

    def is_terminator(self, tok: int) -> bool:
        return tok in self._terminator_set


# --------------------------------------------------------------------------- guided decoding


class LanguageModel(Protocol):
    """What the guided decoder needs from a model (the llama.cpp backend, or a fake in tests)."""

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a piece of text in the middle of a turn (no BOS)."""
        ...

    def evaluate(self, tokens: list[int]) -> bool:
        """Append tokens to the context; False (and nothing appended) if the budget is exhausted."""
        ...

    def logits(self) -> np.ndarray:
        """Next-token logits after everything evaluated so far."""
        ...


Sampler = Callable[[np.ndarray], int]  # logits -> index into them


class _Hurry(Exception):
    pass


class GuidedDecoder:
    """Forces JSON structure and lets the model fill in the values (see the module doc)."""

    def __init__(self, lm: LanguageModel, vocab: TokenVocab, sample: Sampler):
        self.lm = lm
        self.vocab = vocab
        self._sample = sample
        self._pending: list[int | str] = []
        self.hurry = False  # the budget is exhausted: complete everything without the model
        self.hint = ""  # what the model wanted right after the last value it closed
        self._emit: Callable[[str], None] | None = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tok_cache: dict[str, list[int]] = {}
        self._root: dict[str, Any] = {}
        # Model decisions (sampled tokens, including ones that only ended a value) and evaluation calls.
        self.samples = 0
        self.evaluations = 0

    # ---- primitives

    def _tokens(self, text: str) -> list[int]:
        toks = self._tok_cache.get(text)
        if toks is None:
            toks = self._tok_cache[text] = self.lm.tokenize(text)
        return toks

    def force(self, text: str, emit: bool = True) -> None:
        """Append fixed text (evaluated lazily, together with what follows, before the next sample)."""
        if not text:
            return
        self.hint = ""
        if self._pending and isinstance(self._pending[-1], str):
            self._pending[-1] += text
        else:
            self._pending.append(text)
        if emit and self._emit is not None:
            self._emit(text)

    def _accept(self, tok: int, emit: bool = True) -> None:
        self._pending.append(tok)
        if emit and self._emit is not None:
            text = self._utf8.decode(self.vocab.pieces[tok])
            if text:
                self._emit(text)

    def flush(self) -> None:
        """Evaluate everything pending; on an exhausted budget switch to hurry mode."""
        if not self._pending or self.hurry:
            return
        tokens: list[int] = []
        for seg in self._pending:
            if isinstance(seg, str):
                tokens.extend(self.lm.tokenize(seg))
            else:
                tokens.append(seg)
        self._pending.clear()
        if not tokens:
            return
        self.evaluations += 1
        if not self.lm.evaluate(tokens):
            self.hurry = True

    def sample(self, allowed: np.ndarray) -> int | None:
        """The model's pick among `allowed` token ids (None in hurry mode)."""
        if self.hurry or len(allowed) == 0:
            return None
        self.flush()
        if self.hurry:
            return None
        logits = self.lm.logits()
        self.samples += 1
        sub = np.asarray(logits[allowed], dtype=np.float32)
        if not np.isfinite(sub).any():
            return int(allowed[0])
        return int(allowed[self._sample(sub)])

    def choose(self, candidates: Sequence[str], emit: bool = True, end: np.ndarray | None = None) -> int:
        """Index of the candidate text the model picks, walking their token trie.

        A candidate whose tokens are a prefix of another's ends when the model samples one of
        `end` (default: value terminators); that token is not kept. The chosen text is emitted.
        """
        if len(candidates) == 1:
            self.force(candidates[0], emit)
            return 0
        seqs = [self._tokens(c) for c in candidates]
        alive = list(range(len(candidates)))
        depth = 0
        end_ids = self.vocab.terminator if end is None else end
        while True:
            complete = [i for i in alive if len(seqs[i]) == depth]
            children: dict[int, list[int]] = {}
            for i in alive:
                if len(seqs[i]) > depth:
                    children.setdefault(seqs[i][depth], []).append(i)
            if not children:
                chosen = complete[0]
                break
            if len(children) == 1 and not complete:
                tok = next(iter(children))
            else:
                allowed = np.fromiter(children, dtype=np.int64)
                if complete:
                    allowed = np.concatenate([allowed, end_ids])
                tok = self.sample(allowed)  # type: ignore[assignment]
                if tok is None:  # hurry: the first alive candidate, completed without the model
                    chosen = complete[0] if complete else alive[0]
                    self._pending.extend(seqs[chosen][depth:])
                    break
                if tok not in children:
                    chosen = complete[0]
                    text = self.vocab.text[tok] or ""
                    self.hint = text
                    if emit and self._emit is not None:
                        self._emit(candidates[chosen])
                    return chosen
            self._pending.append(tok)
            alive = children[tok]
            depth += 1
        self.hint = ""
        if emit and self._emit is not None:
            self._emit(candidates[chosen])
        return chosen

    # ---- JSON values

    def value(self, schema: Any, lead: str = "", depth: int = 0) -> None:
        """Emit one JSON value matching `schema`, preceded by `lead` (whitespace)."""
        schema = self._resolve(schema)
        if self.hurry or depth > MAX_DEPTH:
            self.force(lead + json.dumps(minimal_value(schema, self._root), ensure_ascii=False))
            return
        if "const" in schema:
            self.force(lead + json.dumps(schema["const"], ensure_ascii=False))
            return
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            self.choose([lead + json.dumps(v, ensure_ascii=False) for v in schema["enum"]])
            return
        kind = schema_type(schema)
        if kind == "object":
            self._object(schema, lead, depth)
        elif kind == "array":
            self._array(schema, lead, depth)
        elif kind in ("integer", "number"):
            self._number(schema, lead, integer=kind == "integer")
        elif kind == "boolean":
            self.choose([lead + "true", lead + "false"])
        elif kind == "null":
            self.force(lead + "null")
        else:
            self._string(schema, lead)

    def _resolve(self, schema: Any, hops: int = 0) -> dict[str, Any]:
        if not isinstance(schema, dict):
            return {}
        ref = schema.get("$ref")
        if isinstance(ref, str) and hops < MAX_DEPTH:
            target = resolve_ref(self._root, ref)
            if target is not None:
                merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
                return self._resolve(merged, hops + 1)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options and "type" not in schema:
                usable = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
                base = {k: v for k, v in schema.items() if k != key}
                return self._resolve({**base, **(usable or options)[0]}, hops + 1)
        return schema

    def _string(self, schema: dict[str, Any], lead: str) -> None:
        min_len = _int(schema.get("minLength"), 0)
        max_len = _int(schema.get("maxLength"), 1 << 30)
        self.force(lead + '"')
        n = 0
        for _ in range(MAX_STRING_TOKENS):
            if n >= max_len:
                break
            allowed = self.vocab.string_or_quote if n >= min_len else self.vocab.string_safe
            tok = self.sample(allowed)
            if tok is None:
                break
            if self.vocab.is_quote(tok):
                self.force('"')
                self.hint = (self.vocab.text[tok] or '"')[1:]
                return
            text = self.vocab.text[tok] or ""
            if n + len(text) > max_len:
                break
            self._accept(tok)
            n += len(text)
        if n < min_len:
            self.force("x" * (min_len - n))
        self.force('"')

    def _number(self, schema: dict[str, Any], lead: str, integer: bool) -> None:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if integer and _is_num(lo) and _is_num(hi) and 0 <= hi - lo <= SMALL_INT_RANGE:
            values = list(range(math.ceil(lo), math.floor(hi) + 1))
            if values:
                self.choose([f"{lead}{v}" for v in values])
                return
        negative_ok = not (_is_num(lo) and lo >= 0)
        self.force(lead)
        text = ""
        while len(text) < MAX_NUMBER_CHARS:
            cands = [t for t in self.vocab.number
                     if _number_prefix_ok(text + (self.vocab.text[t] or ""), integer, negative_ok)]
            complete = _number_complete(text, integer)
            if not cands:
                break
            allowed = np.asarray(cands, dtype=np.int64)
            if complete:
                allowed = np.concatenate([allowed, self.vocab.terminator])
            tok = self.sample(allowed)
            if tok is None:
                break
            if self.vocab.is_terminator(tok) and complete:
                self.hint = (self.vocab.text[tok] or "").lstrip()
                return
            self._accept(tok)
            text += self.vocab.text[tok] or ""
        if not _number_complete(text, integer):
            self.force(_complete_number(text))

    def _object(self, schema: dict[str, Any], lead: str, depth: int) -> None:
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [k for k in schema.get("required", []) if isinstance(k, str)] \
            if isinstance(schema.get("required"), list) else []
        keys = list(props) + [k for k in required if k not in props]
        self.force(lead + "{")
        first = True
        for key in keys:
            if key in required:
                self.force(("" if first else ", ") + json.dumps(key, ensure_ascii=False) + ":")
                self.value(props.get(key, {}), " ", depth + 1)
                first = False
        optional = [k for k in keys if k not in required]
        while optional and not self.hurry:
            hint, self.hint = self.hint, ""
            if hint.startswith("}"):
                break
            cands = [("" if first else ", ") + json.dumps(k, ensure_ascii=False) + ":" for k in optional]
            if not hint.startswith(","):
                cands.append("}")
            i = self.choose(cands)
            if i == len(optional):
                return  # the model closed the object
            key = optional.pop(i)
            self.value(props.get(key, {}), " ", depth + 1)
            first = False
        self.force("}")

    def _array(self, schema: dict[str, Any], lead: str, depth: int) -> None:
        items = schema.get("items")
        if isinstance(items, list):  # old tuple form: use the first entry's schema
            items = items[0] if items else {}
        min_items = _int(schema.get("minItems"), 0)
        max_items = _int(schema.get("maxItems"), DEFAULT_MAX_ITEMS)
        max_items = max(min_items, min(max_items, DEFAULT_MAX_ITEMS))
        self.force(lead + "[")
        n = 0
        # At least one item unless maxItems is 0: the model asked for this array for a reason.
        while n < max(min_items, min(1, max_items)):
            self.value(items, "" if n == 0 else " ", depth + 1)
            n += 1
            if n < min_items:
                self.force(",")
        while n < max_items and not self.hurry:
            hint, self.hint = self.hint, ""
            if hint.startswith("]"):
                break
            if not hint.startswith(","):
                if self.choose([",", "]"]) == 1:
                    return
            else:
                self.force(",")
            self.value(items, " ", depth + 1)
            n += 1
        self.force("]")

    def json_value(self, schema: dict[str, Any], emit: Callable[[str], None]) -> None:
        """A whole JSON value for `schema`, its text streamed to `emit`."""
        self._root = schema if isinstance(schema, dict) else {}
        self._emit = emit
        try:
            self.value(schema)
        finally:
            self._emit = None

    # ---- tool calls

    def tool_call(self, tools: Sequence[ToolSpec], forced: str | None,
                  on_name: Callable[[str], Callable[[str], None]], opening: str = TOOL_CALL_OPEN + CALL_PREFIX
                  ) -> None:
        """One ``<tool_call>`` block; `on_name(name)` returns where the arguments text goes.

        `opening`: the text to force before the function name (the part of ``<tool_call>`` +
        CALL_PREFIX that is not in the context yet).
        """
        self.force(opening, emit=False)
        names = [t.name for t in tools]
        if forced is not None:
            names = [forced]
        index = self.choose([json.dumps(n, ensure_ascii=False)[1:] + "," for n in names], emit=False)
        name = names[index]
        spec = next(t for t in tools if t.name == name)
        self._emit = on_name(name)
        self._root = spec.parameters if isinstance(spec.parameters, dict) else {}
        self.force(' "arguments": ', emit=False)
        params = spec.parameters if isinstance(spec.parameters, dict) and spec.parameters else \
            {"type": "object", "properties": {}}
        if schema_type(self._resolve(params)) != "object":
            params = {"type": "object", "properties": {}}
        self.value(params, "", 0)
        self._emit = None
        self.force("}\n" + TOOL_CALL_CLOSE, emit=False)

    def another_call(self, eog: np.ndarray) -> bool:
        """After a call: does the model write another ``<tool_call>`` (True) or end its turn?"""
        if self.hurry or len(eog) == 0:
            return False
        # Candidate "" is the end of the turn, chosen with an end-of-generation token.
        i = self.choose(["", "\n" + TOOL_CALL_OPEN, TOOL_CALL_OPEN], emit=False, end=eog)
        return i != 0 and not self.hurry  # the marker is in the context: continue with CALL_PREFIX


# --------------------------------------------------------------------------- schema helpers


def schema_type(schema: dict[str, Any]) -> str:
    """The JSON type a (resolved) schema asks for; 'string' when nothing says otherwise."""
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        t = non_null[0] if non_null else (t[0] if t else None)
    if isinstance(t, str) and t in ("object", "array", "string", "integer", "number", "boolean", "null"):
        return t
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def resolve_ref(root: dict[str, Any], ref: str) -> dict[str, Any] | None:
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


def minimal_value(schema: Any, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A small valid value for a schema, without the model (used when the budget runs out)."""
    if not isinstance(schema, dict):
        return ""
    root = root or {}
    if isinstance(schema.get("$ref"), str) and depth < MAX_DEPTH:
        target = resolve_ref(root, schema["$ref"])
        if target is not None:
            return minimal_value({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, root, depth + 1)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and "type" not in schema:
            usable = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
            base = {k: v for k, v in schema.items() if k != key}
            return minimal_value({**base, **(usable or options)[0]}, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema_type(schema)
    if kind == "object":
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        if depth >= MAX_DEPTH:
            return {}
        return {k: minimal_value(props.get(k, {}), root, depth + 1) for k in required if isinstance(k, str)}
    if kind == "array":
        n = _int(schema.get("minItems"), 0)
        items = schema.get("items")
        if isinstance(items, list):
            items = items[0] if items else {}
        return [minimal_value(items, root, depth + 1) for _ in range(n)] if depth < MAX_DEPTH else []
    if kind in ("integer", "number"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        value: float = 0
        if _is_num(lo) and value < lo:
            value = math.ceil(lo) if kind == "integer" else lo
        if _is_num(hi) and value > hi:
            value = math.floor(hi) if kind == "integer" else hi
        return value
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "x" * _int(schema.get("minLength"), 0)


def _int(value: Any, default: int) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_INT_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?")
_NUM_PREFIX = re.compile(r"-?((0|[1-9][0-9]*)(\.[0-9]*)?)?")
_INT_FULL = re.compile(r"-?(0|[1-9][0-9]*)")
_NUM_FULL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")


def _number_prefix_ok(text: str, integer: bool, negative_ok: bool) -> bool:
    if not negative_ok and text.startswith("-"):
        return False
    if len(text) > MAX_NUMBER_CHARS:
        return False
    return (_INT_PREFIX if integer else _NUM_PREFIX).fullmatch(text) is not None


def _number_complete(text: str, integer: bool) -> bool:
    return (_INT_FULL if integer else _NUM_FULL).fullmatch(text) is not None


def _complete_number(text: str) -> str:
    """What to append to a number prefix to make it complete."""
    if text in ("", "-"):
        return "0"
    if text.endswith("."):
        return "0"
    return ""
