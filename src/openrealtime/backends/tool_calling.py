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

so the output is always valid JSON that matches the schema, and every loop is bounded.

The token budget (``max_output_tokens``, the context, the server's cap) holds for everything
written, forced text included. Before each decision the decoder keeps enough budget for the
shortest valid completion of every open value and makes the model wrap up (close the string, skip
optional properties, end the array) when that is all that is left; the call is then complete and
valid. A schema whose minimum does not fit at all (``minItems: 100000``) is decoded as usual and
cut where the budget ends: the call is incomplete (``finish_reason`` "length"). Long forced text
(fillers for ``minLength``, a huge ``const``) is never built whole and reaches the consumer in
pieces of at most ``MAX_DELTA_CHARS``.

Decoding is a generator (:data:`Steps`) that pauses before each model evaluation, so that one
compute thread can interleave several requests (see the llama.cpp backend).

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
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

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
# After a call, another follows when the model puts at least this on opening one (after the closing
# tag and a line break). Measured with qwen2.5-1.5b on 10 requests of bench/tool_cases.py (one-off
# probe, quiet machine): after the only call a request needs < 0.0001, after the first of two
# 0.002-0.03.
ANOTHER_CALL_THRESHOLD = 0.001
# Integer ranges up to this size are chosen like an enum (so minimum/maximum hold).
SMALL_INT_RANGE = 64
# Longest piece of arguments text handed on at once: a forced 10 MB literal still streams.
MAX_DELTA_CHARS = 256
# Tokens kept in hand at each model decision beyond the shortest completion of the open values
# (tokenization at the seams of separately written pieces can differ by a token or two).
BUDGET_MARGIN = 2
# Characters tokenized at once when committing long forced text (and the longest text whose
# tokens are counted exactly when planning the budget).
_CHUNK = 4096
# Minimal values of containers nested deeper than this are empty (recursive schemas terminate).
_MINIMAL_DEPTH = 2 * MAX_DEPTH
_HUGE = 1 << 40

_VALUE_END_CHARS = frozenset(",}] \t\r\n")


# Appended to the tool section of the system prompt. Without it the bundled Qwen2.5 models answer a
# request for the weather in prose most of the time, or with a JSON call in a code fence; with it
# the call is the likely first token for requests that need a tool, and greetings, small talk and
# known facts stay unlikely to start one (measured over bench/tool_cases.py: see bench/tool_calls.py).
TOOL_USE_RULE = (
    "Use a function only when the user asks for something one of them does. Greetings, thanks, small "
    "talk, arithmetic and questions you can answer from your own knowledge get a direct spoken answer "
    f"in plain words, never a function call. When you do call a function, reply with only the "
    f"{TOOL_CALL_OPEN} block; when the user asks for several things, write one block for each."
)
# Closes the turn that carries function results, so that the reply answers from them rather than
# explaining the call or calling again (in the system prompt, the same words made calls less likely
# where they are needed). "keeping their numbers and names": without it the 1.5B now and then drops
# the figure ("It is sunny in Paris." over "23 degrees and sunny"): 112/116 against 116/116 answers
# kept the fact in bench/followup_facts.py, and no other follow-up case moved.
TOOL_RESULT_HINT = "Answer the user's question from these results, in plain words, keeping their numbers and names."
# Qwen2.5's template writes its call format with doubled braces (a Jinja escape that is not one inside
# a string literal); the model then tends to open its calls with "{{". The prompt shows the format the
# model's real calls use.
_DOUBLED_FORMAT = '{{"name": <function-name>, "arguments": <args-json-object>}}'
_CALL_FORMAT = '{"name": <function-name>, "arguments": <args-json-object>}'


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
        f"The result comes back between {TOOL_RESPONSE_OPEN} and {TOOL_RESPONSE_CLOSE} tags.\n"
        f"{TOOL_USE_RULE}"
    )




def with_tool_rule(prompt: str) -> str:
    """A natively rendered prompt with tools, fixed up: the call format as calls are written, and
    :data:`TOOL_USE_RULE` at the end of the system turn (after the tool list, where it works best),
    :data:`TOOL_RESULT_HINT` at the end of each results turn. ChatML turns (``<|im_end|>``, as
    Qwen's) only: another native template keeps its own wording."""
    prompt = prompt.replace(_DOUBLED_FORMAT, _CALL_FORMAT, 1)
    prompt = prompt.replace(f"{TOOL_RESPONSE_CLOSE}<|im_end|>", f"{TOOL_RESPONSE_CLOSE}\n{TOOL_RESULT_HINT}<|im_end|>")
    if TOOL_USE_RULE in prompt:
        return prompt
    tools_end = prompt.find("</tools>")
    end = prompt.find("<|im_end|>", tools_end) if tools_end >= 0 else -1
    if end < 0:
        return prompt
    return f"{prompt[:end]}\n{TOOL_USE_RULE}{prompt[end:]}"


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
        if d.pop("_tool_results", None):
            d["content"] += "\n" + TOOL_RESULT_HINT
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


# How a call opens when the model forgets the tag (small Qwen models often do): bare JSON naming a
# function, maybe with doubled braces or in a code fence; whitespace removed.
_BARE_OPENINGS = ('{"name":"', '{{"name":"', '```json{"name":"', '```{"name":"', '```json{{"name":"')
_BARE_OPENING = re.compile(r'(?:```(?:json)?\s*)?\{\{?\s*"name"\s*:\s*"')


def _could_open(text: str) -> bool:
    """Whether `text` (from a ``{`` or a backtick on) may still become a bare call opening."""
    squeezed = "".join(text.split())
    return any(t.startswith(squeezed) for t in _BARE_OPENINGS)


class CallScanner:
    """Finds where a tool call starts in streamed model text, holding back what could be its start.

    A call opens with the ``<tool_call>`` marker, or (``bare_json``) with a bare JSON call object
    ``{"name": "`` (also ``{{"name": "``, or in a code fence), anywhere in the reply.
    """

    def __init__(self, marker: str = TOOL_CALL_OPEN, bare_json: bool = True):
        self.marker = marker
        self.bare_json = bare_json
        self.text = ""  # the whole reply so far
        self.shown = 0  # how much of it was released as text
        self.bare = False  # the last opening found was a bare JSON object (no marker)
        self._bare_end = 0  # where the text after the last bare opening starts
        self._rejected = 0  # bare openings before this offset were not calls

    def push(self, piece: str) -> tuple[str, int | None]:
        """(text to show now, None), or (text to show, offset in the reply where a call opens)."""
        self.text += piece
        i = self.text.find(self.marker, self.shown)
        if i >= 0:
            self.bare = False
            return self._show(i), i
        rest_at = max(self.shown, self._rejected)
        upto = len(self.text)
        if self.bare_json:
            match = _BARE_OPENING.search(self.text, rest_at)
            if match:
                self.bare = True
                self._bare_end = match.end()
                if not self.text[self.shown:match.start()].strip():
                    self.shown = match.start()  # only blanks before it: never shown
                return self._show(match.start()), match.start()
            for k in range(rest_at, len(self.text)):
                if self.text[k] in "{`" and _could_open(self.text[k:]):
                    upto = k  # still undecided from here on
                    break
        rest = self.text[self.shown:upto]
        if self.shown == 0 and not rest.strip():
            return "", None  # a reply does not start with blanks: they may precede a call
        keep = 0
        for k in range(min(len(rest), len(self.marker) - 1), 0, -1):
            if self.marker.startswith(rest[-k:]):
                keep = k
                break
        return self._show(upto - keep), None

    def flush(self) -> str:
        """Whatever was held back (the reply ended without completing a call opening)."""
        return self._show(len(self.text))

    def after_bare_opening(self) -> str:
        """The text after ``{"name": "`` of the last bare opening (the start of the function name)."""
        return self.text[self._bare_end:] if self.bare else ""

    def reject_bare(self) -> str:
        """The bare opening was not a call after all: look for one only after it; returns the text
        that can be shown now."""
        self.bare = False
        self._rejected = self._bare_end
        return self.push("")[0]

    def _show(self, upto: int) -> str:
        out = self.text[self.shown:upto]
        self.shown = max(self.shown, upto)
        return out


# --------------------------------------------------------------------------- token classes


class TokenVocab:
    """Per-model token classes for guided decoding, computed once from every token's bytes."""

    def __init__(self, pieces: Sequence[bytes], unusable: Iterable[int] = (), eog: Iterable[int] = (),
                 marker: Iterable[int] = ()):
        n = len(pieces)
        self.size = n
        self.pieces = list(pieces)
        # Longest token in bytes: N bytes of text are at least N / max_piece tokens.
        self.max_piece = max((len(p) for p in self.pieces), default=1) or 1
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
        self.unusable = np.flatnonzero(bad).astype(np.int64)  # control and end-of-generation tokens
        # Tokens a reply's first token may not be when it is to be text: what opens a call in one of
        # the forms small models write (a tag, JSON, a code fence) and bare whitespace before one.
        syntax = {t for t, x in enumerate(self.text) if x is not None and x.strip() and x.lstrip()[0] in "{`<"}
        syntax |= set(marker)  # marker: a <tool_call> special token
        self.call_start = ids(sorted(syntax | {t for t, x in enumerate(self.text) if x is not None and not x.strip()}))
        # After a call was taken back the model still wants to write it out, in any wrapping
        # ("Get_weather({"city": ...})"): no token may hold a brace or a backtick, or open a tag.
        self.syntax_any = ids(sorted(syntax | {t for t, x in enumerate(self.text)
                                                if x is not None and any(c in x for c in "{}`")}))
        self.string_or_quote = np.concatenate([self.string_safe, self.quote])
        self._quote_set = frozenset(quote)
        self._terminator_set = frozenset(terminator)

        self._containing: dict[str, np.ndarray] = {}
        self._starting: dict[str, np.ndarray] = {}

    def containing(self, text: str) -> np.ndarray:
        """Tokens whose text contains `text`, ignoring case (cached: one vocabulary scan per string)."""
        text = text.lower()
        if (found := self._containing.get(text)) is None:
            found = np.asarray([t for t, x in enumerate(self.text) if x is not None and text in x.lower()],
                               dtype=np.int64)
            self._containing[text] = found
        return found

    def starting(self, text: str) -> np.ndarray:
        """Tokens whose text starts with `text`, ignoring case (cached)."""
        text = text.lower()
        if (found := self._starting.get(text)) is None:
            found = np.asarray([t for t, x in enumerate(self.text) if x is not None and x.lower().startswith(text)],
                               dtype=np.int64)
            self._starting[text] = found
        return found

    def is_quote(self, tok: int) -> bool:
        return tok in self._quote_set

    def is_terminator(self, tok: int) -> bool:
        return tok in self._terminator_set


def name_stem(name: str) -> str | None:
    """The start of a function name that prose never writes: up to its first separator (``get_``)
    or inner capital (``getW``). None for a name that is a plain word (``search``)."""
    for i, c in enumerate(name):
        if i > 0 and (c in "_-." or (c.isupper() and name[i - 1].islower())):
            return name[: i + 1]
    return None


class NameGuard:
    """Keeps function names out of a text reply: a small model that answers instead of calling
    (or whose call was taken back) tends to explain the call ("use the `lookup_order` function"),
    which is machine text to a listener. The tokens that would complete a name's stem
    (``name_stem``) are ruled out, so the model says "look up" in words or says something else."""

    def __init__(self, vocab: TokenVocab, names: Iterable[str]) -> None:
        self._vocab = vocab
        self._stems = sorted({stem.lower() for n in names if (stem := name_stem(n))})
        self._empty = np.zeros(0, dtype=np.int64)

    def banned(self, text: str) -> np.ndarray:
        """The tokens that may not follow `text` (the reply so far); case is ignored ("Get_weather")."""
        text = text.lower()
        parts = []
        for stem in self._stems:
            parts.append(self._vocab.containing(stem))
            for k in range(1, len(stem)):
                if text.endswith(stem[:k]):
                    parts.append(self._vocab.starting(stem[k:]))
        return np.unique(np.concatenate(parts)) if parts else self._empty


def call_probability(logits: np.ndarray, vocab: TokenVocab) -> float:
    """The model's probability that what it writes next opens a tool call: the mass on the tokens
    that start one in any form (``vocab.call_start``)."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    return float(p[vocab.call_start].sum())


def name_probabilities(logits: np.ndarray, first_tokens: dict[str, int]) -> dict[str, float]:
    """After the opening of a call (``<tool_call>\\n{"name": "``): each function's share of the next
    token (its name's first token), out of the whole vocabulary; names sharing a first token share
    its probability. The likeliest is the name confidence: where a request needs a tool, the bundled
    models are sure which (>= 0.74 over bench/tool_cases.py with qwen2.5-1.5b); where none fits, the
    mass spreads over several names or off them (0.00-0.54 for greetings, thanks, jokes,
    arithmetic), though a lexical match can fool it ("how do you spell" -> lookup_order 0.84)."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    return {name: float(p[token]) for name, token in first_tokens.items()}


def call_key(name: str, arguments: str) -> tuple[str, str]:
    """A call's identity for spotting repeats: the name and the arguments re-serialised with sorted
    keys (when they are JSON)."""
    value = _arguments_value(arguments)
    return name, value.strip() if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def answered_calls(messages: Sequence[ChatMessage]) -> set[tuple[str, str]]:
    """The calls made and answered since the user last spoke (``call_key``s): calling one again
    would be a loop."""
    outputs = set()
    answered: set[tuple[str, str]] = set()
    for m in reversed(messages):
        if m.role == "user":
            break
        if m.role == "tool" and m.tool_call_id is not None:
            outputs.add(m.tool_call_id)
        elif m.role == "assistant" and m.tool_calls:
            answered.update(call_key(c.name, c.arguments) for c in m.tool_calls if c.id in outputs)
    return answered


_WORD = re.compile(r"[^\W_]+")
_COMMON = frozenset("the and for you are with what this that from your have was can how not all but "
                    "please tell know".split())


# A number written with thousands separators ("48,230", "1.000.000", "48 230"): a call writes it
# without them, and speech to text writes spoken order numbers with them.
_GROUPED_DIGITS = re.compile(r"(?<=\d)[,. ](?=\d{3}(?!\d))")


def _words(text: str) -> set[str]:
    """Lower-case words of 3+ letters (cut to 5, a crude stem) and all numbers (also with their
    thousands separators dropped), common words left out."""
    out = set()
    text = text.lower()
    joined = _GROUPED_DIGITS.sub("", text)
    for w in _WORD.findall(text if joined == text else f"{text} {joined}"):
        if w.isdigit():
            out.add(w.lstrip("0") or "0")
        elif len(w) >= 3 and w not in _COMMON:
            out.add(w[:5])
    return out


def _value_words(value: Any) -> set[str]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, int | float):
        return _words(str(int(value)) if float(value).is_integer() else str(value))
    if isinstance(value, str):
        return _words(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return set().union(*(_value_words(v) for v in items)) if items else set()


def grounded(arguments: str, sources: Iterable[str]) -> bool:
    """Whether a call takes something from the conversation: one of its string or number values
    shares a word with `sources` (what was said, tool results, the instructions). Small models
    fill a call they should not make with invented values (order "12345" for "what does ephemeral
    mean?", the weather in Rome for "what is the capital of Italy?"). A call with no such value,
    or arguments that are not JSON, passes."""
    value = _arguments_value(arguments)
    words = set() if isinstance(value, str) else _value_words(value)
    if not words:
        return True
    return any(words & _words(text) for text in sources)


# --------------------------------------------------------------------------- guided decoding

_T = TypeVar("_T")

Steps = Generator[Any, None, _T]
"""Decoding work that pauses (``yield``, with whatever the model's ``evaluate`` yields: the llama.cpp
backend's batching scheduler takes the tokens from there) right before each evaluation by the
model, and returns its result at the end."""

Sink = Callable[[str], None]


def drive(steps: Steps[_T]) -> _T:
    """Run decoding steps to the end without pausing (nobody to share the model with)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class LanguageModel(Protocol):
    """What the guided decoder needs from a model (the llama.cpp backend, or a fake in tests).

    Every token of the output counts against the budget (``room``), whether the model chose it,
    the schema forced it, or it was only counted because nothing is sampled after it.
    """

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a piece of text in the middle of a turn (no BOS)."""
        ...

    def room(self) -> int:
        """Tokens left in the response's budget."""
        ...

    def evaluate(self, tokens: list[int]) -> Iterator[None]:
        """Append at most ``room()`` tokens to the context and count them; may pause (see `Steps`)."""
        ...

    def spend(self, n: int) -> None:
        """Count ``n`` (at most ``room()``) output tokens that are never evaluated: no decision follows them."""
        ...

    def logits(self) -> np.ndarray:
        """Next-token logits after everything evaluated so far."""
        ...


Sampler = Callable[[np.ndarray], int]  # logits -> index into them


class _Cut(Exception):
    """The budget ended: what fitted was committed, nothing more is written."""


class _Lazy:
    """Text known by its UTF-8 size and produced piece by piece.

    Minimal values and fillers can be far longer than any budget (``minItems: 100000``,
    ``minLength: 10000000``), so they are never built whole: only the part that fits is produced.
    """

    __slots__ = ("_make", "size")

    def __init__(self, size: int, make: Callable[[], Iterator[str]]) -> None:
        self.size = size
        self._make = make

    def pieces(self) -> Iterator[str]:
        return self._make()


Text = str | _Lazy


def _size(text: Text) -> int:
    return text.size if isinstance(text, _Lazy) else len(text.encode())


def _pieces(text: Text) -> Iterator[str]:
    return text.pieces() if isinstance(text, _Lazy) else iter((text,))


def _repeat(char: str, count: int) -> _Lazy:
    def make() -> Iterator[str]:
        full, rest = divmod(count, _CHUNK)
        for _ in range(full):
            yield char * _CHUNK
        if rest:
            yield char * rest
    return _Lazy(count * len(char.encode()), make)


def _prefix(parts: Iterable[Text], limit: int) -> str:
    """About the first `limit` characters of the concatenated parts."""
    out: list[str] = []
    n = 0
    for part in parts:
        for piece in _pieces(part):
            out.append(piece[:limit - n])
            n += len(out[-1])
            if n >= limit:
                return "".join(out)
    return "".join(out)


@dataclass(slots=True)
class _Seg:
    """Pending output: forced text (``tokens`` None, tokenized when committed), or tokens the model
    sampled with the text they show. `sink` receives the text (None: not shown, e.g. markup);
    `closes` marks the end of the value being written."""

    tokens: list[int] | None
    text: Text
    sink: Sink | None
    closes: bool = False


class _Minimal:
    """The shortest valid JSON text of schemas (sharing one `$ref` root), sized without building it."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self._sizes: dict[tuple[int, int], tuple[Any, int]] = {}

    def text(self, schema: Any, depth: int) -> _Lazy:
        return _Lazy(self.size(schema, depth), lambda: self.pieces(schema, depth))

    def _shape(self, schema: Any, depth: int) -> tuple[str, Any]:
        s = resolve_schema(schema, self.root)
        if "const" in s:
            return "text", json.dumps(s["const"], ensure_ascii=False)
        if isinstance(s.get("enum"), list) and s["enum"]:
            return "text", json.dumps(s["enum"][0], ensure_ascii=False)
        kind = schema_type(s)
        if kind == "object":
            if depth >= _MINIMAL_DEPTH:
                return "text", "{}"
            props, keys, required = object_keys(s)
            fields = [k for k in keys if k in required]
            return "object", [(("" if i == 0 else ", ") + json.dumps(k, ensure_ascii=False) + ": ", props.get(k, {}))
                              for i, k in enumerate(fields)]
        if kind == "array":
            count = _int(s.get("minItems"), 0)
            if count == 0 or depth >= _MINIMAL_DEPTH:
                return "text", "[]"
            return "array", (array_items(s), count)
        if kind in ("integer", "number"):
            return "text", json.dumps(minimal_number(s, integer=kind == "integer"))
        if kind == "boolean":
            return "text", "false"
        if kind == "null":
            return "text", "null"
        return "string", _int(s.get("minLength"), 0)

    def size(self, schema: Any, depth: int) -> int:
        """UTF-8 length of ``pieces(schema, depth)``, saturating at a huge value."""
        key = (id(schema), depth)
        hit = self._sizes.get(key)
        if hit is not None and hit[0] is schema:
            return hit[1]
        kind, data = self._shape(schema, depth)
        if kind == "text":
            n = len(data.encode())
        elif kind == "string":
            n = 2 + data
        elif kind == "object":
            n = 2 + sum(len(p.encode()) + self.size(c, depth + 1) for p, c in data)
        else:
            item, count = data
            n = 2 + count * (self.size(item, depth + 1) + 2) - 2
        n = min(n, _HUGE)
        self._sizes[key] = (schema, n)  # the schema is kept so that its id stays unique
        return n

    def pieces(self, schema: Any, depth: int) -> Iterator[str]:
        kind, data = self._shape(schema, depth)
        if kind == "text":
            yield data
        elif kind == "string":
            yield '"'
            yield from _repeat("x", data).pieces()
            yield '"'
        elif kind == "object":
            yield "{"
            for prefix, child in data:
                yield prefix
                yield from self.pieces(child, depth + 1)
            yield "}"
        else:
            item, count = data
            yield "["
            for i in range(count):
                if i:
                    yield ", "
                yield from self.pieces(item, depth + 1)
            yield "]"


class _Frame:
    """An open value of the output, and the text that would close it soonest."""

    def rest(self, close: bool = True) -> list[Text]:
        """That text; without the frame's own closing bracket if not `close`."""
        raise NotImplementedError


class _ObjectFrame(_Frame):
    def __init__(self, minimal: _Minimal, props: dict[str, Any], todo: list[str], depth: int) -> None:
        self.minimal, self.props, self.todo, self.depth = minimal, props, todo, depth
        self.first = True  # no property written yet

    def rest(self, close: bool = True) -> list[Text]:
        out: list[Text] = []
        first = self.first
        for key in self.todo:
            out.append(("" if first else ", ") + json.dumps(key, ensure_ascii=False) + ": ")
            out.append(self.minimal.text(self.props.get(key, {}), self.depth + 1))
            first = False
        if close:
            out.append("}")
        return out


class _ArrayFrame(_Frame):
    def __init__(self, minimal: _Minimal, item: Any, depth: int) -> None:
        self.minimal, self.item, self.depth = minimal, item, depth
        self.required = 0  # items the array must have
        self.started = 0  # items begun so far

    def rest(self, close: bool = True) -> list[Text]:
        out: list[Text] = []
        left, first = self.required - self.started, self.started == 0
        if left > 0:
            one = self.minimal.size(self.item, self.depth + 1)
            size = min(left * (one + 2) - (2 if first else 0), _HUGE)
            out.append(_Lazy(size, lambda: self._items(left, first)))
        if close:
            out.append("]")
        return out

    def _items(self, left: int, first: bool) -> Iterator[str]:
        for i in range(left):
            if i or not first:
                yield ", "
            yield from self.minimal.pieces(self.item, self.depth + 1)


class _StringFrame(_Frame):
    def __init__(self, min_len: int) -> None:
        self.min_len = min_len
        self.length = 0  # characters written

    def rest(self, close: bool = True) -> list[Text]:
        need = self.min_len - self.length
        return [_repeat("x", need), '"'] if need > 0 else ['"']


class _NumberFrame(_Frame):
    def __init__(self, empty: str) -> None:
        self.empty = empty  # the minimal number, while nothing is written
        self.text = ""

    def rest(self, close: bool = True) -> list[Text]:
        tail = _complete_number(self.text) if self.text else self.empty
        return [tail] if tail else []


class GuidedDecoder:
    """Forces JSON structure and lets the model fill in the values (see the module doc).

    The budget: every committed token counts (``LanguageModel.room``). Before each model decision
    the decoder checks that, after it, the shortest valid completion of everything still open fits
    in what is left (plus `BUDGET_MARGIN`); options that do not fit are not offered, and when only
    the shortest completion fits, it is written at once (`squeezes` counts such decisions). When not
    even that fits (a schema whose minimum is larger than the budget), decoding goes on as usual
    and is cut where the budget ends: ``cut`` is set, and ``truncated`` if the value was unfinished.
    Text reaches the sinks when its tokens are committed, in pieces of at most `MAX_DELTA_CHARS`.
    """

    def __init__(self, lm: LanguageModel, vocab: TokenVocab, sample: Sampler):
        self.lm = lm
        self.vocab = vocab
        self._sample = sample
        self._pending: list[_Seg] = []
        self._pending_bytes = 0  # upper bound of the pending text's UTF-8 size
        self._frames: list[_Frame] = []
        self._sink: Sink | None = None
        self._open = False  # a value has begun and is not committed to its end yet
        self.cut = False  # the budget ended
        self.truncated = False  # ... in the middle of a value
        self.squeezes = 0  # decisions the budget made for the model
        self.hint = ""  # what the model wanted right after the last value it closed
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tok_cache: dict[str, list[int]] = {}
        self._root: dict[str, Any] = {}
        self._minimal = _Minimal({})
        # Model decisions (sampled tokens, including ones that only ended a value) and evaluation calls.
        self.samples = 0
        self.evaluations = 0
        # The model's probability on the function name it favours, read when `tool_call` is given a
        # `min_confidence`; `declined`: it was below, and nothing was chosen.
        self.name_confidence: float | None = None
        self.name_probabilities: dict[str, float] = {}  # each function's; the likeliest is the confidence
        self.declined = False

    # ---- committing output

    def _tokens(self, text: str) -> list[int]:
        toks = self._tok_cache.get(text)
        if toks is None:
            toks = self.lm.tokenize(text)
            if len(text) <= 256:
                self._tok_cache[text] = toks
        return toks

    def force(self, text: Text, emit: bool = True) -> None:
        """Append fixed text (committed together with what follows, before the next decision)."""
        if isinstance(text, str):
            if not text:
                return
            if len(text) > _CHUNK:
                text = _Lazy(len(text.encode()), lambda t=text: iter((t,)))  # type: ignore[misc]
        elif text.size == 0:
            return
        self.hint = ""
        sink = self._sink if emit else None
        last = self._pending[-1] if self._pending else None
        if (isinstance(text, str) and last is not None and last.tokens is None and last.sink is sink
                and isinstance(last.text, str) and len(last.text) < _CHUNK):
            last.text += text
        else:
            self._pending.append(_Seg(None, text, sink))
        self._pending_bytes += _size(text)
        if self._pending_bytes > (self.lm.room() + 1) * self.vocab.max_piece:
            # Certainly more than the budget: stop piling up forced text (loops of 10**5 items).
            tokens = self._commit()
            self._cut(len(tokens))

    def _accept(self, tok: int) -> None:
        """Keep a token the model sampled."""
        sink = self._sink
        text = self._utf8.decode(self.vocab.pieces[tok]) if sink is not None else ""
        self._pending.append(_Seg([tok], text, sink))
        self._pending_bytes += 1

    def _show(self, text: str, emit: bool) -> None:
        """Show `text` once the tokens before it are committed (the chosen text of `choose`)."""
        if emit and self._sink is not None and text:
            self._pending.append(_Seg([], text, self._sink))

    def _end_value(self) -> None:
        self._pending.append(_Seg([], "", None, closes=True))

    def _cut(self, counted: int) -> NoReturn:
        self.lm.spend(counted)
        self._pending.clear()
        self._pending_bytes = 0
        self.cut = True
        self.truncated = self.truncated or self._open
        raise _Cut

    def _commit(self) -> list[int]:
        """Count the pending output against the budget and show its text; returns its tokens.

        When the budget ends first, the part that fits is counted and shown, and `_Cut` is raised.
        """
        room = self.lm.room()
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        tokens: list[int] = []
        out: list[tuple[Sink, str]] = []
        complete = True
        i = 0
        while complete and i < len(pending):
            seg = pending[i]
            if seg.tokens is not None:
                if len(tokens) + len(seg.tokens) > room:
                    complete = False
                    break
                tokens.extend(seg.tokens)
                if seg.sink is not None and seg.text:
                    out.append((seg.sink, seg.text))  # type: ignore[arg-type]
                if seg.closes:
                    self._open = False
                i += 1
                continue
            j = i
            while j < len(pending) and pending[j].tokens is None:
                j += 1
            complete = self._commit_run(pending[i:j], room, tokens, out)
            i = j
        self._send(out)
        if not complete:
            self._cut(len(tokens))
        return tokens

    def _commit_run(self, run: list[_Seg], room: int, tokens: list[int], out: list[tuple[Sink, str]]) -> bool:
        """Tokenize consecutive forced texts as one (in chunks when long); False if the budget ends."""
        buf: list[tuple[_Seg, str]] = []
        chars = 0

        def take() -> bool:
            toks = self.lm.tokenize("".join(p for _, p in buf))
            left = room - len(tokens)
            fits = len(toks) <= left
            if not fits:
                toks = toks[:max(left, 0)]
            tokens.extend(toks)
            shown = len(b"".join(self.vocab.pieces[t] for t in toks).decode("utf-8", "ignore")) if not fits \
                else _HUGE
            for seg, piece in buf:
                k = min(len(piece), shown)
                shown -= k
                if k and seg.sink is not None:
                    out.append((seg.sink, piece[:k]))
            return fits

        for seg in run:
            for piece in _pieces(seg.text):
                for start in range(0, len(piece), _CHUNK):
                    part = piece[start:start + _CHUNK]
                    buf.append((seg, part))
                    chars += len(part)
                    if chars >= _CHUNK:
                        if not take():
                            return False
                        buf.clear()
                        chars = 0
        return take() if buf else True

    @staticmethod
    def _send(out: list[tuple[Sink, str]]) -> None:
        merged: list[tuple[Sink, list[str]]] = []
        for sink, text in out:
            if merged and merged[-1][0] is sink:
                merged[-1][1].append(text)
            else:
                merged.append((sink, [text]))
        for sink, parts in merged:
            text = "".join(parts)
            for k in range(0, len(text), MAX_DELTA_CHARS):
                sink(text[k:k + MAX_DELTA_CHARS])

    def _flush(self) -> Steps[None]:
        if self._pending:
            tokens = self._commit()
            if tokens:
                self.evaluations += 1
                yield from self.lm.evaluate(tokens)

    def flush(self) -> Steps[None]:
        """Commit and evaluate everything pending (the model goes on after it)."""
        try:
            yield from self._flush()
        except _Cut:
            pass

    def finish(self) -> None:
        """The output ends here: commit what is pending without evaluating it."""
        if not self._pending:
            return
        try:
            self.lm.spend(len(self._commit()))
        except _Cut:
            pass

    # ---- the budget

    def _tail(self, close: bool = True) -> list[Text]:
        """The shortest text that closes every open value (without the innermost closer if not `close`)."""
        out: list[Text] = []
        for i, frame in enumerate(reversed(self._frames)):
            out.extend(frame.rest(close or i > 0))
        return out

    def _count(self, parts: list[Text], room: int) -> int:
        """Tokens of the concatenated parts: exact when short, else estimated from a sample."""
        size = sum(_size(p) for p in parts)
        if size == 0:
            return 0
        if size <= _CHUNK:
            return len(self.lm.tokenize(_prefix(parts, _CHUNK)))
        lower = -(-size // self.vocab.max_piece)
        if lower > room:
            return lower
        sample = _prefix(parts, _CHUNK)
        return -(-len(self.lm.tokenize(sample)) * size // max(1, len(sample.encode())))

    def _cost(self, room: int, sampled: int = 0, after: Sequence[Text] = (), join: bool = False) -> int:
        """Tokens to commit what is pending, then `sampled` model tokens, then the text `after`
        (in one run with the pending text when `join`: forced with no decision in between).

        A cheap upper bound is returned when that already fits in `room` with the margin.
        """
        tokens = 0
        runs: list[list[Text]] = []
        run: list[Text] | None = None
        for seg in self._pending:
            if seg.tokens is None:
                if run is None:
                    run = []
                    runs.append(run)
                run.append(seg.text)
            else:
                tokens += len(seg.tokens)
                run = None
        if after:
            if join and run is not None:
                run.extend(after)
            else:
                runs.append(list(after))
        quick = tokens + sampled + sum(_size(t) for r in runs for t in r)
        if quick + BUDGET_MARGIN <= room:
            return quick
        return tokens + sampled + sum(self._count(r, room) for r in runs)

    def _more(self) -> bool:
        """Before one more token of a string or number: True to sample it, False to close the value
        now because afterwards the shortest completion would no longer fit."""
        room = self.lm.room()
        tail = self._tail()
        if self._cost(room, 1, tail) + BUDGET_MARGIN <= room:
            return True
        if self._cost(room, 0, tail, join=True) <= room:
            self.squeezes += 1
            return False
        return True  # not even the shortest completion fits: write on until the budget ends

    def _affordable(self, candidates: Sequence[str], extras: Sequence[Sequence[Text]] | None,
                    closer: int | None, avoid: int | None) -> list[int]:
        """The candidates `choose` may offer (see the class doc); `avoid` only if nothing else fits."""
        room = self.lm.room()
        tails = {True: self._tail(), False: self._tail(close=False) if closer is not None else []}
        limit = (room + 1) * self.vocab.max_piece

        def after(i: int) -> list[Text]:
            return [*(extras[i] if extras else ()), *tails[i != closer]]

        everything = [i for i, c in enumerate(candidates) if len(c) <= limit]
        if not everything:
            return [0]  # every option is longer than the whole budget: written as it is, and cut
        walk = {i: self._cost(room, len(self._tokens(candidates[i])), after(i)) for i in everything}
        fit = [i for i in everything if walk[i] + BUDGET_MARGIN <= room]
        if not fit:
            forced = {i: self._cost(room, 0, [candidates[i], *after(i)], join=True) for i in everything}
            best = min(everything, key=forced.__getitem__)
            if forced[best] <= room:
                self.squeezes += 1
                return [best]
            fit = everything  # the budget cannot be met anyway
        elif len(fit) < len(candidates):
            self.squeezes += 1
        if avoid in fit and len(fit) > 1:
            fit.remove(avoid)  # type: ignore[arg-type]
        return fit

    # ---- model decisions

    def sample(self, allowed: np.ndarray, greedy: bool = False) -> Steps[int]:
        """The model's pick among `allowed` token ids (after committing what is pending); `greedy`:
        its likeliest."""
        yield from self._flush()
        if self.lm.room() < 1:
            self._cut(0)
        logits = self.lm.logits()
        self.samples += 1
        sub = np.asarray(logits[allowed], dtype=np.float32)
        if not np.isfinite(sub).any():
            return int(allowed[0])
        return int(allowed[int(np.argmax(sub)) if greedy else self._sample(sub)])

    def choose(self, candidates: Sequence[str], emit: bool = True, end: np.ndarray | None = None,
               extras: Sequence[Sequence[Text]] | None = None, closer: int | None = None,
               avoid: int | None = None, greedy: bool = False) -> Steps[int]:
        """Index of the candidate text the model picks, walking their token trie (`greedy`: the
        likeliest branch at each token).

        A candidate whose tokens are a prefix of another's ends when the model samples one of
        `end` (default: value terminators); that token is not kept. The chosen text is emitted.
        For the budget: `extras[i]` is the shortest text candidate i commits to after itself, and
        `closer` the candidate that closes the innermost open value; `avoid` is left out when
        others are possible (the model already said it wants to go on).
        """
        if len(candidates) == 1:
            self.force(candidates[0], emit)
            return 0
        options = self._affordable(candidates, extras, closer, avoid)
        if len(options) == 1:
            self.force(candidates[options[0]], emit)
            return options[0]
        seqs = {i: self._tokens(candidates[i]) for i in options}
        alive = options
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
                allowed = np.fromiter(children, dtype=np.int64, count=len(children))
                if complete:
                    allowed = np.concatenate([allowed, end_ids])
                tok = yield from self.sample(allowed, greedy)
                if tok not in children:
                    chosen = complete[0]
                    self._show(candidates[chosen], emit)
                    self.hint = self.vocab.text[tok] or ""
                    return chosen
            self._pending.append(_Seg([tok], "", None))
            self._pending_bytes += 1
            alive = children[tok]
            depth += 1
        self._show(candidates[chosen], emit)
        self.hint = ""
        return chosen

    # ---- JSON values

    def value(self, schema: Any, lead: str = "", depth: int = 0) -> Steps[None]:
        """Emit one JSON value matching `schema`, preceded by `lead` (whitespace)."""
        raw = schema
        schema = resolve_schema(schema, self._root)
        if depth > MAX_DEPTH:
            self.force(lead)
            self.force(self._minimal.text(raw, depth))
            return
        if "const" in schema:
            self.force(lead + json.dumps(schema["const"], ensure_ascii=False))
            return
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            yield from self.choose([lead + json.dumps(v, ensure_ascii=False) for v in schema["enum"]])
            return
        kind = schema_type(schema)
        if kind == "object":
            yield from self._object(schema, lead, depth)
        elif kind == "array":
            yield from self._array(schema, lead, depth)
        elif kind in ("integer", "number"):
            yield from self._number(schema, lead, integer=kind == "integer")
        elif kind == "boolean":
            yield from self.choose([lead + "true", lead + "false"])
        elif kind == "null":
            self.force(lead + "null")
        else:
            yield from self._string(schema, lead)

    def _string(self, schema: dict[str, Any], lead: str) -> Steps[None]:
        min_len = _int(schema.get("minLength"), 0)
        max_len = _int(schema.get("maxLength"), 1 << 30)
        self.force(lead + '"')
        frame = _StringFrame(min_len)
        self._frames.append(frame)
        n = 0
        try:
            for _ in range(MAX_STRING_TOKENS):
                if n >= max_len:
                    break
                frame.length = n
                if not self._more():
                    break
                allowed = self.vocab.string_or_quote if n >= min_len else self.vocab.string_safe
                tok = yield from self.sample(allowed)
                if self.vocab.is_quote(tok):
                    self.force('"')
                    self.hint = (self.vocab.text[tok] or '"')[1:]
                    return
                text = self.vocab.text[tok] or ""
                if n + len(text) > max_len:
                    break
                self._accept(tok)
                n += len(text)
        finally:
            self._frames.pop()
        if n < min_len:
            self.force(_repeat("x", min_len - n))  # streamed and cut by the budget like any text
        self.force('"')

    def _number(self, schema: dict[str, Any], lead: str, integer: bool) -> Steps[None]:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if integer and _is_num(lo) and _is_num(hi) and 0 <= hi - lo <= SMALL_INT_RANGE:
            values = list(range(math.ceil(lo), math.floor(hi) + 1))
            if values:
                yield from self.choose([f"{lead}{v}" for v in values])
                return
        negative_ok = not (_is_num(lo) and lo >= 0)
        self.force(lead)
        frame = _NumberFrame(json.dumps(minimal_number(schema, integer)))
        self._frames.append(frame)
        text = ""
        try:
            while len(text) < MAX_NUMBER_CHARS:
                cands = [t for t in self.vocab.number
                         if _number_prefix_ok(text + (self.vocab.text[t] or ""), integer, negative_ok)]
                complete = _number_complete(text, integer)
                if not cands:
                    break
                frame.text = text
                if not self._more():
                    break
                allowed = np.asarray(cands, dtype=np.int64)
                if complete:
                    allowed = np.concatenate([allowed, self.vocab.terminator])
                tok = yield from self.sample(allowed)
                if self.vocab.is_terminator(tok) and complete:
                    self.hint = (self.vocab.text[tok] or "").lstrip()
                    return
                self._accept(tok)
                text += self.vocab.text[tok] or ""
        finally:
            self._frames.pop()
        if not text:
            self.force(frame.empty)
        elif not _number_complete(text, integer):
            self.force(_complete_number(text))

    def _object(self, schema: dict[str, Any], lead: str, depth: int) -> Steps[None]:
        props, keys, required = object_keys(schema)
        self.force(lead + "{")
        frame = _ObjectFrame(self._minimal, props, [k for k in keys if k in required], depth)
        self._frames.append(frame)
        try:
            while frame.todo:
                key = frame.todo.pop(0)
                self.force(("" if frame.first else ", ") + json.dumps(key, ensure_ascii=False) + ":")
                frame.first = False
                yield from self.value(props.get(key, {}), " ", depth + 1)
            optional = [k for k in keys if k not in required]
            while optional:
                hint, self.hint = self.hint, ""
                if hint.startswith("}"):
                    break
                sep = "" if frame.first else ", "
                cands = [sep + json.dumps(k, ensure_ascii=False) + ":" for k in optional] + ["}"]
                extras: list[list[Text]] = [[" ", self._minimal.text(props.get(k, {}), depth + 1)] for k in optional]
                end = len(optional)
                i = yield from self.choose(cands, extras=[*extras, []], closer=end,
                                           avoid=end if hint.startswith(",") else None)
                if i == end:
                    return  # the model closed the object
                frame.first = False
                key = optional.pop(i)
                yield from self.value(props.get(key, {}), " ", depth + 1)
            self.force("}")
        finally:
            self._frames.pop()

    def _array(self, schema: dict[str, Any], lead: str, depth: int) -> Steps[None]:
        items = array_items(schema)
        min_items = _int(schema.get("minItems"), 0)
        max_items = _int(schema.get("maxItems"), DEFAULT_MAX_ITEMS)
        max_items = max(min_items, min(max_items, DEFAULT_MAX_ITEMS))
        self.force(lead + "[")
        frame = _ArrayFrame(self._minimal, items, depth)
        self._frames.append(frame)
        try:
            required = min_items
            if required == 0 and max_items > 0:
                # At least one item, budget permitting: the model asked for this array for a reason.
                room = self.lm.room()
                one = [self._minimal.text(items, depth + 1), *self._tail()]
                if self._cost(room, 0, one, join=True) + BUDGET_MARGIN <= room:
                    required = 1
                else:
                    self.squeezes += 1
            frame.required = required
            for j in range(required):
                if j:
                    self.force(",")
                frame.started = j + 1
                yield from self.value(items, " " if j else "", depth + 1)
            n = required
            while 0 < n < max_items:  # with no item (the budget said so) the array is empty
                hint, self.hint = self.hint, ""
                if hint.startswith("]"):
                    break
                i = yield from self.choose([",", "]"], extras=[[" ", self._minimal.text(items, depth + 1)], []],
                                           closer=1, avoid=1 if hint.startswith(",") else None)
                if i == 1:
                    return
                yield from self.value(items, " ", depth + 1)
                n += 1
            self.force("]")
        finally:
            self._frames.pop()

    def json_value(self, schema: dict[str, Any], emit: Sink) -> Steps[None]:
        """A whole JSON value for `schema`, its text streamed to `emit` as it is committed (the end
        is committed by a later `flush` or `finish`)."""
        self._root = schema if isinstance(schema, dict) else {}
        self._minimal = _Minimal(self._root)
        self._sink = emit
        self._open = True
        try:
            yield from self.value(schema)
            self._end_value()
        except _Cut:
            pass
        finally:
            self._sink = None

    # ---- tool calls

    def tool_call(self, tools: Sequence[ToolSpec], forced: str | None,
                  on_name: Callable[[str], Sink], opening: str = TOOL_CALL_OPEN + CALL_PREFIX,
                  min_confidence: float = 0.0) -> Steps[None]:
        """One ``<tool_call>`` block up to the end of its arguments; `on_name(name)` returns where
        the arguments text goes. The closing markup is only written by `another_call`.

        `opening`: the text to force before the function name (the part of ``<tool_call>`` +
        CALL_PREFIX that is not in the context yet). `min_confidence`: with the opening in the
        context, the model must put at least this on the first token of one name (``name_confidence``),
        else the call is `declined` before a name is chosen (nothing emitted; the caller takes the
        opening back).
        """
        try:
            self.force(opening, emit=False)
            specs = [t for t in tools if forced is None or t.name == forced]
            arguments = [call_arguments(t) for t in specs]
            extras: list[list[Text]] = [[' "arguments": ', _Minimal(root).text(params, 0)]
                                        for root, params in arguments]
            names = [json.dumps(t.name, ensure_ascii=False)[1:] + "," for t in specs]
            if min_confidence > 0:
                yield from self._flush()
                self.name_probabilities = name_probabilities(
                    self.lm.logits(), {t.name: self._tokens(n)[0] for t, n in zip(specs, names, strict=True)
                                       if self._tokens(n)})
                self.name_confidence = max(self.name_probabilities.values(), default=0.0)
                if self.name_confidence < min_confidence:
                    self.declined = True
                    return
            # Which function: the model's likeliest, whatever the temperature. Sampled, an unlikely
            # name sometimes won (web_search for "add ... a review with Ann on Tuesday to my
            # calendar"); the words of the arguments are still sampled.
            index = yield from self.choose(names, emit=False, extras=extras, greedy=True)
            self._root, params = arguments[index]
            self._minimal = _Minimal(self._root)
            self._sink = on_name(specs[index].name)
            self._open = True
            self.force(' "arguments": ', emit=False)
            yield from self.value(params, "", 0)
            self._end_value()
        except _Cut:
            pass
        finally:
            self._sink = None

    def another_call(self, eog: np.ndarray) -> Steps[bool]:
        """After a call: does the model write another ``<tool_call>`` (True) or end its turn?

        The finished call and a line break are committed first; the model goes on when it puts
        ``ANOTHER_CALL_THRESHOLD`` on opening a call there. (Sampling between the end of the turn
        and a line break, as before, made the bundled models list every tool: they put 0.99 on the
        line break, then ~1.0 on ending.) False without asking when the budget is too short.
        """
        if self.cut or len(eog) == 0:
            return False
        closing = "}\n" + TOOL_CALL_CLOSE + "\n"
        room = self.lm.room()
        if self._cost(room, len(self._tokens(TOOL_CALL_OPEN + CALL_PREFIX)), [closing]) + BUDGET_MARGIN > room:
            return False
        self.force(closing, emit=False)
        try:
            yield from self._flush()
        except _Cut:
            return False
        if call_probability(self.lm.logits(), self.vocab) < ANOTHER_CALL_THRESHOLD:
            return False
        self.force(TOOL_CALL_OPEN, emit=False)
        return True  # the marker is in the context: continue with CALL_PREFIX


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


def resolve_schema(schema: Any, root: dict[str, Any], hops: int = 0) -> dict[str, Any]:
    """The schema with local ``$ref`` followed and ``anyOf`` / ``oneOf`` reduced to their first
    non-null alternative (what guided decoding writes)."""
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and hops < MAX_DEPTH:
        target = resolve_ref(root, ref)
        if target is not None:
            merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            return resolve_schema(merged, root, hops + 1)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and "type" not in schema:
            usable = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
            base = {k: v for k, v in schema.items() if k != key}
            return resolve_schema({**base, **(usable or options)[0]}, root, hops + 1)
    return schema


def object_keys(schema: dict[str, Any]) -> tuple[dict[str, Any], list[str], set[str]]:
    """(properties, every key in the order written, the required ones) of an object schema."""
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = [k for k in schema["required"] if isinstance(k, str)] \
        if isinstance(schema.get("required"), list) else []
    keys = list(dict.fromkeys([*props, *required]))
    return props, keys, set(required)


def array_items(schema: dict[str, Any]) -> Any:
    items = schema.get("items")
    if isinstance(items, list):  # old tuple form: use the first entry's schema
        items = items[0] if items else {}
    return items


def call_arguments(tool: ToolSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """($ref root, object schema) guided decoding writes a tool's arguments with."""
    root = tool.parameters if isinstance(tool.parameters, dict) else {}
    params = root or {"type": "object", "properties": {}}
    if schema_type(resolve_schema(params, root)) != "object":
        params = {"type": "object", "properties": {}}
    return root, params


def minimal_number(schema: dict[str, Any], integer: bool) -> float:
    """The number closest to 0 within ``minimum`` / ``maximum``."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    value: float = 0
    if _is_num(lo) and value < lo:
        value = math.ceil(lo) if integer else lo
    if _is_num(hi) and value > hi:
        value = math.floor(hi) if integer else hi
    return value


def minimal_value(schema: Any, root: dict[str, Any] | None = None) -> Any:
    """The smallest valid value for a schema, as guided decoding writes it when the budget runs
    short (built whole: for small schemas only)."""
    if root is None:
        root = schema if isinstance(schema, dict) else {}
    return json.loads("".join(_Minimal(root).pieces(schema, 0)))


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
