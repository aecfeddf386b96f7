"""Hostile Realtime client events and a WebSocket driver that checks what the server answers.

Shared by the property-based test (tests/e2e/test_fuzz.py, hypothesis drives it) and the long run
(bench/fuzz.py). Every generated `Frame` says what the server owes it, so the checks need no
knowledge of the engine:

- ``expect="error"``: bad whatever the session's state (wrong types, out-of-range values, unknown
  ids, malformed JSON...): exactly one `error` naming its event_id, and the `param` when known;
- ``expect="ok"``: valid whatever the state: no `error`;
- ``expect="maybe"``: depends on state (an id that may exist, a cancel that may find a response):
  at most one `error`.

Frames whose event_id cannot be read (not JSON, not an object, a non-string event_id) are
"anonymous": each must get exactly one `error` with ``event_id: null``. On top of that the driver
checks that every server event validates against the official SDK's types, that no error is a
`server_error`, that every `response.created` ends in exactly one `response.done`, that the
session stays open, and that a normal text turn still completes after the fuzzing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import json
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import websockets
from hypothesis import strategies as st
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter, ValidationError

from openrealtime.protocol.text import scrub
from tests.e2e.conftest import assert_valid_server_event

# A pseudo-frame for FuzzSession: delete every item in the conversation (between plans of long runs).
RESET = "reset"
# Replaced by the frame's event_id when it is sent (raw frames and templates that set their own id).
MARK = "@@EID@@"
Expect = Literal["error", "ok", "maybe"]
Echo = Literal["id", "none", "first512", "scrub"]


@dataclass(frozen=True, slots=True)
class Ref:
    """An id picked when the frame is sent: the `index`-th one the session knows of (else unknown)."""

    kind: Literal["item", "response", "call"]
    index: int


@dataclass(frozen=True, slots=True)
class Fresh:
    """A client-chosen id never used before in the session (for events that must succeed)."""

    kind: Literal["item", "call"]


@dataclass(slots=True, repr=False)
class Frame:
    """One WebSocket message and what the server owes it."""

    kind: str  # which generator made it (for reports)
    expect: Expect
    event: dict[str, Any] | None = None  # a JSON template (may hold Ref / Fresh); event_id is added
    raw: str | bytes | None = None  # sent as is, MARK replaced by the event_id
    keep_id: bool = False  # the template sets `event_id` itself (MARK inside, or a non-string)
    echo: Echo = "id"
    param: str | None = None  # the error's `param` (checked when given)
    code: str | None = None  # the error's `code` (checked when given)
    ascii: bool = True  # JSON-escape non-ASCII (always, when a string holds a lone surrogate)
    binary: bool = False  # a binary WebSocket frame instead of a text one
    starts_response: bool = False  # a response.create: if not refused, it must end in response.done
    sync: bool = False  # wait for a round trip after sending (lets Refs see server-made ids)

    def __repr__(self) -> str:  # short: hypothesis prints whole plans when a test fails
        body = _short(self.raw if self.raw is not None else self.event, 200)
        return f"Frame({self.kind}, {self.expect}, {body}{', binary' if self.binary else ''})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's pretty-printer
        printer.text(repr(self))


# ----------------------------------------------------------------------------- text

SPECIAL_TEXT = [
    "", "\x00", "a\x00b", "\u202eevil\u202c", "שלום עולם", "مرحبا بالعالم", "\u200f\u200e\u061c",
    "\ufeff", "\uffff\ufffe", "\U0010ffff", "👨‍👩‍👧‍👦", "🏳️‍🌈", "e\u0301\u0302\u0303\u0304", "\u2028\u2029",
    "\r\n\t\x0b\x0c", '"\\/', "</script><script>alert(1)</script>", "\u0085", "Z̷̧͖̓a̵̛l̶g̷o̸",
    "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594",
    "\x7f\x1b[31m", "{{user}} ${x} %s %n", "😀",
]
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00\ud83d"]
# Strings pydantic never reads as a number or a boolean (lax mode reads "1", "yes", "inf"...).
NOT_NUMERIC = st.text("abcdefghijklmnopqrstuvwyz", max_size=6).map(lambda s: "x" + s)


@functools.cache
def long_text(max_len: int) -> st.SearchStrategy[str]:
    """A long string made by repetition (hypothesis cannot draw 100k characters directly)."""
    units = st.one_of(st.sampled_from([s for s in SPECIAL_TEXT if s]), st.text(min_size=1, max_size=6))
    return st.tuples(units, st.integers(1, max(1, max_len))).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[:t[1]])


@functools.cache
def text_ok(max_len: int = 200) -> st.SearchStrategy[str]:
    """Valid Unicode that is hard to handle: NUL, RTL marks, emoji sequences, noncharacters, length."""
    return st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(max_size=30), long_text(max_len))


@functools.cache
@st.composite
def text_surrogate(draw: st.DrawFn) -> str:
    """A string holding a lone UTF-16 surrogate (sent as a JSON escape such as "\\ud800")."""
    return draw(st.text(max_size=8)) + draw(st.sampled_from(LONE_SURROGATES)) + draw(st.text(max_size=8))


# Text the model reads (instructions, messages, tool descriptions) stays short: long prompts cost the
# LLM seconds each, and hard-to-handle length goes into fields it never reads (ids, names, tracing).
LLM_TEXT = 80
IDENT = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)

# ----------------------------------------------------------------------------- valid building blocks


def _user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


@functools.cache
@st.composite
def valid_item(draw: st.DrawFn, max_len: int = 200, item_id: Any = None) -> dict[str, Any]:
    """A conversation item that validates (text messages of every role, a function call)."""
    text = draw(text_ok(max_len))
    choice = draw(st.sampled_from(["user", "system", "assistant", "alias", "function_call"]))
    if choice == "function_call":
        item: dict[str, Any] = {"type": "function_call", "call_id": Fresh("call"), "name": draw(IDENT),
                                "arguments": draw(st.sampled_from(["{}", '{"a": 1}', "not json", ""]))}
    elif choice == "assistant":
        item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}
    elif choice == "alias":  # the beta-era "text" part, stored as output_text
        item = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": text}]}
    else:
        item = {"type": "message", "role": choice, "content": [{"type": "input_text", "text": text}]}
    if item_id is not None:
        item["id"] = item_id
    return item


@functools.cache
def valid_response(conversation: str = "auto", max_tokens: int = 8) -> st.SearchStrategy[dict[str, Any]]:
    """A response config that runs cheaply: text only, a handful of tokens."""
    return st.fixed_dictionaries(
        {"output_modalities": st.just(["text"]), "max_output_tokens": st.integers(1, max_tokens),
         "conversation": st.just(conversation)},
        optional={"instructions": text_ok(100), "temperature": st.floats(0, 2),
                  "metadata": st.dictionaries(IDENT, text_ok(50).filter(lambda s: len(s) <= 512), max_size=3),
                  "tool_choice": st.sampled_from(["auto", "none"]), "voice": text_ok(40)})


@functools.cache
def harmless_session_update(max_len: int) -> st.SearchStrategy[dict[str, Any]]:
    """`session.update` bodies that are valid in any state and keep responses cheap (text only)."""
    tool = st.fixed_dictionaries({"type": st.just("function"), "name": IDENT,
                                  "description": text_ok(100),
                                  "parameters": st.just({"type": "object", "properties": {}})})
    return st.one_of(
        st.builds(lambda t: {"instructions": t}, text_ok(LLM_TEXT)),
        st.builds(lambda t: {"temperature": t}, st.floats(0, 2)),
        st.builds(lambda ts, c: {"tools": ts, "tool_choice": c}, st.lists(tool, max_size=2),
                  st.sampled_from(["auto", "none"])),
        st.builds(lambda r: {"truncation": r}, st.one_of(
            st.just("auto"), st.floats(0, 1).map(lambda x: {"type": "retention_ratio", "retention_ratio": x}))),
        st.builds(lambda t: {"tracing": t}, st.one_of(
            st.none(), st.just("auto"),
            st.builds(lambda w, m: {"workflow_name": w, "metadata": m}, text_ok(max_len),
                      st.dictionaries(text_ok(20), text_ok(50), max_size=3)))),
        st.builds(lambda e: {"reasoning": {"effort": e}}, st.sampled_from(["minimal", "low", "medium", "high"])),
        st.builds(lambda i, v: {"prompt": {"id": i, "variables": v}}, text_ok(50).filter(bool),
                  st.dictionaries(IDENT, text_ok(50), max_size=3)),
        st.builds(lambda v: {"audio": {"output": {"voice": v}}}, text_ok(max_len)),
        st.builds(lambda s: {"audio": {"output": {"speed": s}}}, st.floats(0.25, 1.5)),
        st.builds(lambda f: {"audio": {"input": {"format": {"type": f}}}},
                  st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma"])),
        st.builds(lambda p: {"audio": {"input": {"transcription": {"model": "whisper-1", "language": "en",
                                                                   "prompt": p}}}}, text_ok(100)),
        st.builds(lambda n: {"audio": {"input": {"noise_reduction": n}}},
                  st.sampled_from([None, {"type": "near_field"}, {"type": "far_field"}])),
        # Turn detection that never starts a response by itself (no create_response, no idle timeout).
        st.builds(lambda td: {"audio": {"input": {"turn_detection": td}}}, st.one_of(
            st.none(),
            st.builds(lambda th: {"type": "server_vad", "create_response": False, "threshold": th}, st.floats(0, 1)),
            st.just({"type": "semantic_vad", "create_response": False}))),
        st.builds(lambda m: {"max_output_tokens": m}, st.one_of(st.integers(1, 4096), st.just("inf"))),
        st.just({"output_modalities": ["text"]}),
        st.builds(lambda b: {"parallel_tool_calls": b}, st.booleans()),
        st.just({"include": ["item.input_audio_transcription.logprobs"]}),
        st.just({"model": "gpt-realtime"}),
        # Read-only fields are accepted and ignored, whatever their type.
        st.builds(lambda v: {"id": v, "object": v, "expires_at": v}, st.one_of(st.integers(), IDENT, st.none())),
    ).map(lambda body: {"type": "realtime", **body})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@functools.cache
@st.composite
def passthrough(draw: st.DrawFn) -> Frame:
    """Arbitrary JSON in the session fields the server keeps without reading (echoed in session.updated):
    accepted or refused, what is echoed must still match the SDK's types."""
    anything = draw(JSON_VALUES)
    body = draw(st.sampled_from([
        {"reasoning": {"effort": anything}}, {"reasoning": {"x_extra": anything}},
        {"prompt": {"id": "p", "variables": {"v": anything}}}, {"tracing": {"metadata": {"m": anything}}},
        {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "x": anything}}]},
    ]))
    return Frame("passthrough", "maybe", event={"type": "session.update", "session": {"type": "realtime", **body}})


# ----------------------------------------------------------------------------- wrong types

_BOOL_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}
_SMALL_OBJ = st.dictionaries(IDENT, st.integers(), max_size=2)
_SMALL_LIST = st.lists(st.integers(), max_size=2)
_FRACTION = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda f: f != int(f))
WRONG: dict[str, st.SearchStrategy[Any]] = {
    # Values of a JSON type that pydantic never coerces to the field's type (not even in lax mode).
    "str": st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                     _SMALL_OBJ, _SMALL_LIST),
    "int": st.one_of(NOT_NUMERIC, _FRACTION, _SMALL_OBJ, _SMALL_LIST),
    "float": st.one_of(NOT_NUMERIC, _SMALL_OBJ, _SMALL_LIST),
    "bool": st.one_of(st.integers().filter(lambda i: i not in (0, 1)), _FRACTION,
                      NOT_NUMERIC.filter(lambda s: s not in _BOOL_WORDS), _SMALL_OBJ, _SMALL_LIST),
    "obj": st.one_of(st.text(max_size=5), st.integers(), st.booleans(), _SMALL_LIST),
    "list": st.one_of(st.text(max_size=5), st.integers(), st.booleans(), _SMALL_OBJ),
    # Literals (every allowed value starts with something other than "x"), and int | "inf".
    "lit": st.one_of(NOT_NUMERIC, st.integers().filter(lambda i: i != 24000), st.booleans(), _SMALL_OBJ,
                     _SMALL_LIST),
    # A literal or an object (tool_choice, truncation, tracing): objects would be judged by their keys.
    "choice": st.one_of(NOT_NUMERIC, st.integers(), st.booleans(), _SMALL_LIST),
    "tokens": st.one_of(NOT_NUMERIC, _FRACTION, _SMALL_OBJ, _SMALL_LIST),
}

_TD = {"type": "server_vad", "create_response": False}
_TOOL = {"type": "function", "name": "f"}
_RESP = {"output_modalities": ["text"], "max_output_tokens": 4, "conversation": "none"}


def _session(**body: Any) -> dict[str, Any]:
    return {"session": {"type": "realtime", **body}}


def _item(**fields: Any) -> dict[str, Any]:
    return {"item": {**_user_message("hi"), **fields}}


@dataclass(frozen=True, slots=True)
class Target:
    """A field of a client event: where it is in a valid `scaffold` event, and its kind."""

    type: str
    scaffold: dict[str, Any]
    path: tuple[str | int, ...]
    kind: str
    param: str | None = "path"  # "path": the error names the field itself; None: not checked

    @property
    def wire_path(self) -> str:
        out = ""
        for step in self.path:
            out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
        return out


def _t(type_: str, scaffold: dict[str, Any], path: str, kind: str, param: str | None = "path") -> Target:
    steps: list[str | int] = []
    for part in path.split("."):
        name, _, index = part.partition("[")
        steps.append(name)
        if index:
            steps.append(int(index.rstrip("]")))
    return Target(type_, scaffold, tuple(steps), kind, param)


_FC = {"item": {"type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"}}
_FCO = {"item": {"type": "function_call_output", "call_id": "c", "output": "o"}}
_MCPR = {"item": {"type": "mcp_approval_response", "approval_request_id": "r", "approve": True}}
_MCPL = {"item": {"type": "mcp_list_tools", "server_label": "s", "tools": []}}
_MCPC = {"item": {"type": "mcp_call", "server_label": "s", "name": "n", "arguments": "{}"}}
_RETENTION = {"type": "retention_ratio", "retention_ratio": 0.5, "token_limits": {"post_instructions": 10}}
_SU, _CIC, _RC = "session.update", "conversation.item.create", "response.create"
_TRUNC = {"item_id": "x", "content_index": 0, "audio_end_ms": 0}
# A valid event of each type (event_id and type aside).
SCAFFOLDS: dict[str, dict[str, Any]] = {
    _SU: _session(), "input_audio_buffer.append": {"audio": ""}, "input_audio_buffer.commit": {},
    "input_audio_buffer.clear": {}, "output_audio_buffer.clear": {}, _CIC: _item(),
    "conversation.item.retrieve": {"item_id": "x"}, "conversation.item.delete": {"item_id": "x"},
    "conversation.item.truncate": _TRUNC, _RC: {}, "response.cancel": {},
}
# Every field of every client event (tests/unit/test_fuzz_generators.py checks none is missing).
TARGETS: list[Target] = [
    *(_t(t, scaffold, "event_id", "str") for t, scaffold in SCAFFOLDS.items()),
    _t(_SU, _session(), "session", "obj"),
    _t(_SU, _session(), "session.type", "lit"),
    _t(_SU, _session(), "session.model", "str"),
    _t(_SU, _session(), "session.instructions", "str"),
    _t(_SU, _session(), "session.output_modalities", "list"),
    _t(_SU, _session(output_modalities=["text"]), "session.output_modalities[0]", "lit"),
    _t(_SU, _session(), "session.temperature", "float"),
    _t(_SU, _session(), "session.max_output_tokens", "tokens"),
    _t(_SU, _session(), "session.audio", "obj"),
    _t(_SU, _session(audio={}), "session.audio.input", "obj"),
    _t(_SU, _session(audio={}), "session.audio.output", "obj"),
    _t(_SU, _session(audio={"input": {}}), "session.audio.input.format", "obj"),
    _t(_SU, _session(audio={"input": {"format": {}}}), "session.audio.input.format.type", "lit"),
    _t(_SU, _session(audio={"input": {"format": {}}}), "session.audio.input.format.rate", "lit"),
    _t(_SU, _session(audio={"input": {}}), "session.audio.input.noise_reduction", "obj"),
    _t(_SU, _session(audio={"input": {"noise_reduction": {"type": "near_field"}}}),
       "session.audio.input.noise_reduction.type", "lit"),
    _t(_SU, _session(audio={"input": {}}), "session.audio.input.transcription", "obj"),
    *(_t(_SU, _session(audio={"input": {"transcription": {}}}), f"session.audio.input.transcription.{f}", "str")
      for f in ("model", "language", "prompt")),
    _t(_SU, _session(audio={"input": {}}), "session.audio.input.turn_detection", "obj"),
    _t(_SU, _session(audio={"input": {"turn_detection": dict(_TD)}}), "session.audio.input.turn_detection.type",
       "lit"),
    *(_t(_SU, _session(audio={"input": {"turn_detection": dict(_TD)}}), f"session.audio.input.turn_detection.{f}",
         k) for f, k in (("threshold", "float"), ("prefix_padding_ms", "int"), ("silence_duration_ms", "int"),
                         ("create_response", "bool"), ("interrupt_response", "bool"), ("idle_timeout_ms", "int"))),
    *(_t(_SU, _session(audio={"input": {"turn_detection": {"type": "semantic_vad", "create_response": False}}}),
         f"session.audio.input.turn_detection.{f}", k)
      for f, k in (("eagerness", "lit"), ("create_response", "bool"), ("interrupt_response", "bool"))),
    _t(_SU, _session(audio={"output": {}}), "session.audio.output.format", "obj"),
    _t(_SU, _session(audio={"output": {"format": {}}}), "session.audio.output.format.type", "lit"),
    _t(_SU, _session(audio={"output": {}}), "session.audio.output.voice", "str"),
    _t(_SU, _session(audio={"output": {}}), "session.audio.output.speed", "float"),
    _t(_SU, _session(audio={"output": {}}), "session.audio.output.model", "str"),
    _t(_SU, _session(), "session.tools", "list"),
    _t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0]", "obj"),
    _t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0].type", "lit"),
    _t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0].name", "str"),
    _t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0].description", "str"),
    _t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0].parameters", "obj"),
    _t(_SU, _session(), "session.tool_choice", "choice"),
    _t(_SU, _session(tool_choice={"type": "function", "name": "f"}), "session.tool_choice.name", "str", None),
    _t(_SU, _session(), "session.truncation", "choice"),
    _t(_SU, _session(truncation=dict(_RETENTION)), "session.truncation.retention_ratio", "float", None),
    _t(_SU, _session(truncation=dict(_RETENTION)), "session.truncation.token_limits", "obj", None),
    _t(_SU, _session(truncation=dict(_RETENTION)), "session.truncation.token_limits.post_instructions", "int",
       None),
    _t(_SU, _session(), "session.tracing", "choice"),
    *(_t(_SU, _session(tracing={}), f"session.tracing.{f}", k, None)
      for f, k in (("workflow_name", "str"), ("group_id", "str"), ("metadata", "obj"))),
    _t(_SU, _session(), "session.include", "list"),
    _t(_SU, _session(include=["item.input_audio_transcription.logprobs"]), "session.include[0]", "lit"),
    _t(_SU, _session(), "session.prompt", "obj"),
    *(_t(_SU, _session(prompt={"id": "p"}), f"session.prompt.{f}", k)
      for f, k in (("id", "str"), ("version", "str"), ("variables", "obj"))),
    _t(_SU, _session(), "session.reasoning", "obj"),
    _t(_SU, _session(), "session.parallel_tool_calls", "bool"),
    _t("input_audio_buffer.append", {"audio": ""}, "audio", "str"),
    _t(_CIC, _item(), "previous_item_id", "str"),
    _t(_CIC, _item(), "item", "obj"),
    _t(_CIC, _item(), "item.id", "str"),
    _t(_CIC, _item(), "item.type", "lit"),
    _t(_CIC, _item(), "item.object", "lit"),
    _t(_CIC, _item(), "item.status", "lit"),
    _t(_CIC, _item(), "item.role", "lit"),
    _t(_CIC, _item(), "item.content", "list"),
    _t(_CIC, _item(), "item.content[0]", "obj"),
    _t(_CIC, _item(), "item.content[0].type", "lit"),
    _t(_CIC, _item(), "item.content[0].text", "str"),
    *(_t(_CIC, {"item": {"type": "message", "role": "user", "content": [{"type": "input_audio"}]}},
         f"item.content[0].{f}", "str") for f in ("audio", "transcript")),
    *(_t(_CIC, {"item": {"type": "message", "role": "user", "content": [{"type": "input_image"}]}},
         f"item.content[0].{f}", k) for f, k in (("image_url", "str"), ("detail", "lit"))),
    *(_t(_CIC, _FC, f"item.{f}", "str") for f in ("call_id", "name", "arguments")),
    _t(_CIC, _FCO, "item.output", "str"),
    *(_t(_CIC, _MCPR, f"item.{f}", k) for f, k in (("approval_request_id", "str"), ("approve", "bool"),
                                                    ("reason", "str"))),
    *(_t(_CIC, _MCPL, f"item.{f}", k) for f, k in (("server_label", "str"), ("tools", "list"))),
    _t(_CIC, _MCPC, "item.error", "obj"),
    _t("conversation.item.retrieve", {"item_id": "x"}, "item_id", "str"),
    _t("conversation.item.delete", {"item_id": "x"}, "item_id", "str"),
    *(_t("conversation.item.truncate", {"item_id": "x", "content_index": 0, "audio_end_ms": 0}, f, k)
      for f, k in (("item_id", "str"), ("content_index", "int"), ("audio_end_ms", "int"))),
    _t(_RC, {}, "response", "obj"),
    _t(_RC, {"response": dict(_RESP)}, "response.conversation", "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.input", "list"),
    _t(_RC, {"response": {**_RESP, "input": [_user_message("hi")]}}, "response.input[0]", "obj"),
    _t(_RC, {"response": {**_RESP, "input": [_user_message("hi")]}}, "response.input[0].role", "lit"),
    _t(_RC, {"response": {**_RESP, "input": [{"type": "item_reference", "id": "x"}]}}, "response.input[0].id",
       "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.instructions", "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.output_modalities", "list"),
    _t(_RC, {"response": dict(_RESP)}, "response.output_modalities[0]", "lit"),
    _t(_RC, {"response": dict(_RESP)}, "response.max_output_tokens", "tokens"),
    _t(_RC, {"response": dict(_RESP)}, "response.metadata", "obj"),
    _t(_RC, {"response": {**_RESP, "metadata": {"k": "v"}}}, "response.metadata.k", "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.tools", "list"),
    _t(_RC, {"response": {**_RESP, "tools": [dict(_TOOL)]}}, "response.tools[0].name", "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.tool_choice", "choice"),
    _t(_RC, {"response": dict(_RESP)}, "response.audio", "obj"),
    _t(_RC, {"response": {**_RESP, "audio": {}}}, "response.audio.output", "obj"),
    _t(_RC, {"response": {**_RESP, "audio": {"output": {}}}}, "response.audio.output.format", "obj"),
    _t(_RC, {"response": {**_RESP, "audio": {"output": {"format": {}}}}}, "response.audio.output.format.type",
       "lit"),
    _t(_RC, {"response": {**_RESP, "audio": {"output": {}}}}, "response.audio.output.voice", "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.voice", "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.temperature", "float"),
    _t(_RC, {"response": dict(_RESP)}, "response.prompt", "obj"),
    _t(_RC, {"response": {**_RESP, "prompt": {"id": "p"}}}, "response.prompt.id", "str"),
    _t(_RC, {"response": dict(_RESP)}, "response.reasoning", "obj"),
    _t(_RC, {"response": dict(_RESP)}, "response.parallel_tool_calls", "bool"),
    _t("response.cancel", {}, "response_id", "str"),
]

# Strict objects (unknown keys refused) and values out of their range, in valid scaffolds.
STRICT_OBJECTS: list[Target] = [
    *(_t(t, scaffold, "", "obj") for t, scaffold in SCAFFOLDS.items()),
    _t(_SU, _session(), "session", "obj"),
    _t(_SU, _session(audio={"input": {"format": {}}}), "session.audio.input.format", "obj"),
    _t(_SU, _session(audio={"input": {"turn_detection": dict(_TD)}}), "session.audio.input.turn_detection", "obj"),
    _t(_SU, _session(audio={"input": {"transcription": {}}}), "session.audio.input.transcription", "obj"),
    _t(_SU, _session(audio={"output": {}}), "session.audio.output", "obj"),
    _t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0]", "obj"),
    _t(_SU, _session(prompt={"id": "p"}), "session.prompt", "obj"),
    _t(_CIC, _item(), "item", "obj"),
    _t(_CIC, _item(), "item.content[0]", "obj"),
    _t(_RC, {"response": dict(_RESP)}, "response", "obj"),
    _t(_RC, {"response": {**_RESP, "audio": {"output": {}}}}, "response.audio.output", "obj"),
    _t(_RC, {"response": {**_RESP, "input": [{"type": "item_reference", "id": "x"}]}}, "response.input[0]", "obj"),
]
OUT_OF_RANGE: list[tuple[Target, list[Any]]] = [
    (_t("conversation.item.truncate", _TRUNC, "content_index", "int"), [-1, -(10**12)]),
    (_t("conversation.item.truncate", _TRUNC, "audio_end_ms", "int"), [-1, -(10**12)]),
    (_t(_SU, _session(), "session.temperature", "float"), [-0.01, 2.01, 1e308, -1e308]),
    (_t(_SU, _session(), "session.max_output_tokens", "int"), [0, -1, 4097, 10**15]),
    (_t(_SU, _session(), "session.output_modalities", "list"), [[]]),
    *((_t(_SU, _session(audio={"input": {"turn_detection": dict(_TD)}}), f"session.audio.input.turn_detection.{f}",
          "int"), vals)
      for f, vals in (("threshold", [-0.01, 1.01]), ("prefix_padding_ms", [-1, 10_001]),
                      ("silence_duration_ms", [-1, 10_001]), ("idle_timeout_ms", [4_999, 30_001, 0]))),
    (_t(_SU, _session(audio={"output": {}}), "session.audio.output.speed", "float"), [0.24, 1.51, 0]),
    (_t(_SU, _session(truncation=dict(_RETENTION)), "session.truncation.retention_ratio", "float", None),
     [-0.1, 1.1]),
    (_t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0].name", "str"), ["", "a" * 65, "bad name!", "é"]),
    (_t(_SU, _session(prompt={"id": "p"}), "session.prompt.id", "str"), [""]),
    (_t(_CIC, _item(), "item.id", "str"), ["", "i" * 65]),
    (_t(_RC, {"response": dict(_RESP)}, "response.temperature", "float"), [-1, 2.5]),
    (_t(_RC, {"response": dict(_RESP)}, "response.max_output_tokens", "int"), [0, 4097]),
    (_t(_RC, {"response": dict(_RESP)}, "response.output_modalities", "list"), [[]]),
    (_t(_RC, {"response": dict(_RESP)}, "response.metadata", "obj"),
     [{f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}]),
]


def _set(obj: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def _event(target: Target) -> dict[str, Any]:
    return {"type": target.type, **copy.deepcopy(target.scaffold)}


def _param(target: Target) -> str | None:
    return target.wire_path if target.param == "path" else target.param


@functools.cache
@st.composite
def wrong_type(draw: st.DrawFn) -> Frame:
    """A field of a client event with a value of a JSON type it never accepts."""
    target = draw(st.sampled_from(TARGETS))
    event = _event(target)
    value = draw(WRONG[target.kind])
    _set(event, target.path, value)
    if target.path == ("event_id",):  # the id cannot be read, so the error cannot name it
        return Frame("wrong_type", "error", event=event, keep_id=True, echo="none", param="event_id")
    return Frame("wrong_type", "error", event=event, param=_param(target), ascii=draw(st.booleans()))


@functools.cache
@st.composite
def unknown_parameter(draw: st.DrawFn) -> Frame:
    target = draw(st.sampled_from(STRICT_OBJECTS))
    event = _event(target)
    key = "x_" + draw(IDENT)
    node: Any = event
    for step in target.path if target.path != ("",) else ():
        node = node[step]
    node[key] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
    param = f"{target.wire_path}.{key}" if target.path != ("",) else key
    return Frame("unknown_parameter", "error", event=event, param=param, code="unknown_parameter")


MISSING: list[tuple[Target, str | None]] = [
    # (a valid scaffold and the field removed, the param the error names)
    (_t(_SU, _session(), "session", "obj"), "session"),
    (_t("input_audio_buffer.append", {"audio": ""}, "audio", "str"), "audio"),
    (_t(_CIC, _item(), "item", "obj"), "item"),
    (_t(_CIC, _item(), "item.type", "lit"), "item.type"),
    (_t(_CIC, _item(), "item.content[0].type", "lit"), "item.content[0].type"),
    (_t(_CIC, _item(), "item.role", "lit"), "item"),  # a model-level rule: messages need a role
    (_t(_CIC, _item(), "item.content", "list"), "item"),
    (_t(_CIC, _FC, "item.call_id", "str"), "item"),
    (_t("conversation.item.retrieve", {"item_id": "x"}, "item_id", "str"), "item_id"),
    (_t("conversation.item.delete", {"item_id": "x"}, "item_id", "str"), "item_id"),
    *((_t("conversation.item.truncate", _TRUNC, f, "str"), f) for f in _TRUNC),
    (_t(_SU, _session(tools=[dict(_TOOL)]), "session.tools[0].name", "str"), "session.tools[0].name"),
    (_t(_SU, _session(prompt={"id": "p"}), "session.prompt.id", "str"), "session.prompt.id"),
    (_t(_SU, _session(audio={"input": {"noise_reduction": {"type": "near_field"}}}),
        "session.audio.input.noise_reduction.type", "lit"), "session.audio.input.noise_reduction.type"),
    (_t(_RC, {"response": {**_RESP, "input": [{"type": "item_reference", "id": "x"}]}}, "response.input[0].id",
        "str"), "response.input[0].id"),
    (_t(_RC, {"event_id": "x"}, "type", "lit"), "type"),
]


# Required fields of objects session.update merges into the current session (not replaced whole).
_MERGED_REQUIRED = {"id", "type"}


@functools.cache
@st.composite
def missing_field(draw: st.DrawFn) -> Frame:
    target, param = draw(st.sampled_from(MISSING))
    event = _event(target)
    node: Any = event
    for step in target.path[:-1]:
        node = node[step]
    del node[target.path[-1]]
    if target.type == _SU and target.path[-1] in _MERGED_REQUIRED:  # an earlier update may have set it
        return Frame("missing_field", "maybe", event=event)
    return Frame("missing_field", "error", event=event, param=param)


@functools.cache
@st.composite
def out_of_range(draw: st.DrawFn) -> Frame:
    target, values = draw(st.sampled_from(OUT_OF_RANGE))
    event = _event(target)
    _set(event, target.path, copy.deepcopy(draw(st.sampled_from(values))))
    return Frame("out_of_range", "error", event=event, param=_param(target))


@functools.cache
@st.composite
def long_event_id(draw: st.DrawFn) -> Frame:
    """An event_id over 512 characters: refused, and the error names its first 512."""
    event = {"type": "input_audio_buffer.clear", "event_id": MARK + "x" * draw(st.integers(513, 5000))}
    return Frame("long_event_id", "error", event=event, keep_id=True, echo="first512", param="event_id")


# ----------------------------------------------------------------------------- malformed frames


@functools.cache
@st.composite
def valid_event(draw: st.DrawFn) -> dict[str, Any]:
    """A plain valid event to break (truncate, wrap, re-encode); never one that starts a response."""
    return draw(st.one_of(
        st.builds(lambda s: {"type": "session.update", "session": s}, harmless_session_update(50)),
        st.builds(lambda i: {"type": "conversation.item.create", "item": i}, valid_item(50)),
        st.just({"type": "input_audio_buffer.clear"}),
    ))


def _dumps(event: dict[str, Any], ascii_only: bool = True) -> str:
    return json.dumps(_resolve_static(event), ensure_ascii=ascii_only)


def _resolve_static(node: Any) -> Any:
    """Templates with Fresh ids, for frames that never reach validation: any unique-looking id."""
    if isinstance(node, dict):
        return {k: _resolve_static(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_static(v) for v in node]
    if isinstance(node, (Fresh, Ref)):
        return f"static_{node.kind}"
    return node


@functools.cache
@st.composite
def malformed(draw: st.DrawFn) -> Frame:
    """Frames that are not a JSON object with a readable event_id."""
    base = {**draw(valid_event()), "event_id": MARK}
    text = _dumps(base)
    choice = draw(st.integers(0, 12))
    if choice == 0:  # truncated: no proper prefix of an object is JSON
        cut = draw(st.integers(0, len(text) - 1))
        return Frame("truncated", "error", raw=text[:cut], echo="none", code="invalid_json")
    if choice == 1:  # JSON, but not an object
        value = draw(st.sampled_from(["1", "null", "true", '"text"', "[]", "[1,2]", "-0.0", "1e999"]))
        return Frame("not_object", "error", raw=draw(st.sampled_from([value, f"[{text}]"])), echo="none",
                     code="invalid_event")
    if choice == 2:  # binary frames that are not UTF-8 (0xFF and 0xC0 never occur in UTF-8)
        junk = draw(st.binary(max_size=64))
        raw = draw(st.sampled_from([b"\xff" + junk, b"\xc0\xaf" + junk, text.encode()[:-1] + b"\xff}"]))
        return Frame("not_utf8", "error", raw=raw, echo="none", binary=True)
    if choice == 12:  # CESU-8: a surrogate encoded as UTF-8 bytes is read as a lone surrogate
        raw = f'{{"type":"session.update","session":{{"instructions":"a\xed\xa0\x80b"}},"event_id":"{MARK}"}}'
        return Frame("cesu8", "error", raw=raw.encode("latin-1"), binary=True, param="session.instructions",
                     code="invalid_value")
    if choice == 3:  # control characters raw inside a string: not JSON
        return Frame("control_char", "error", raw=text.replace(MARK, MARK + "\x01", 1), echo="none",
                     code="invalid_json")
    if choice == 4:  # an integer too long to parse
        digits = "1" * draw(st.integers(4301, 20_000))
        raw = f'{{"type":"conversation.item.truncate","item_id":"x","content_index":{digits},"audio_end_ms":0,' \
              f'"event_id":"{MARK}"}}'
        return Frame("huge_int", "error", raw=raw, echo="none", code="invalid_json")
    if choice == 5:  # empty frame, whitespace, a lone BOM
        return Frame("empty", "error", raw=draw(st.sampled_from(["", " ", "\n", "\ufeff", "\ufeff{}"])),
                     echo="none")
    if choice == 6:  # an object without event_id or type
        return Frame("no_id", "error", raw="{}", echo="none", param="type", code="missing_required_parameter")
    if choice == 7:  # NaN / Infinity tokens (Python's json accepts them) where numbers go
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        raw, param = draw(st.sampled_from([
            (f'{{"type":"conversation.item.truncate","item_id":"x","content_index":{token},"audio_end_ms":0,'
             f'"event_id":"{MARK}"}}', "content_index"),
            (f'{{"type":"session.update","session":{{"temperature":{token}}},"event_id":"{MARK}"}}',
             "session.temperature"),
            (f'{{"type":"response.create","response":{{"temperature":{token}}},"event_id":"{MARK}"}}',
             "response.temperature"),
        ]))
        return Frame("nan_token", "error", raw=raw, param=param)
    if choice == 8:  # duplicate keys: the last one wins, and it is not a known type
        raw = f'{{"type":"input_audio_buffer.clear","event_id":"{MARK}","type":"x_clear"}}'
        return Frame("duplicate_key", "error", raw=raw, param="type")
    if choice == 9:  # a valid event as a binary frame (UTF-8 JSON): handled like text
        return Frame("binary_valid", "ok", event=_without_id(base), binary=True, ascii=draw(st.booleans()))
    if choice == 10:  # JSON that is a number where the object's type should be
        return Frame("type_not_string", "error",
                     event={"type": draw(st.one_of(st.integers(), st.booleans(), _SMALL_LIST, _SMALL_OBJ))},
                     param="type")
    # trailing garbage after a valid object
    return Frame("trailing", "error", raw=text + draw(st.sampled_from(["}", ",", " x", "{}", "\x00"])),
                 echo="none", code="invalid_json")


def _without_id(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "event_id"}


# ----------------------------------------------------------------------------- nesting


def _nest(depth: int, style: int, with_ids: bool) -> str:
    """A JSON value exactly `depth` containers deep."""
    if with_ids:  # every level has an `event_id` key: only the top-level one names the event
        return '{"event_id":"inner","a":' * depth + "1" + "}" * depth
    if style == 0:
        return "[" * depth + "]" * depth
    if style == 1:
        return '{"a":' * depth + "null" + "}" * depth
    return '[{"a":' * (depth // 2) + ("[]" if depth % 2 else "null") + "}]" * (depth // 2)


# How deep the container holding the nested value already is, per place in a session.update.
_DEEP_PLACES = {
    "tracing": ('{"metadata":{"a":', "}}", 4), "reasoning": ('{"a":', "}", 3),
    "prompt": ('{"id":"p","variables":{"a":', "}}", 4),
    "tools": ('[{"type":"function","name":"f","parameters":{"a":', "}}]", 5), "x_unknown": ("", "", 2),
}


@functools.cache
@st.composite
def deep(draw: st.DrawFn, max_depth: int = 5000) -> Frame:
    """Nesting up to `max_depth`: deeper than 100 levels in all is refused with nesting_too_deep."""
    ok = draw(st.booleans())
    # tracing.metadata is free-form JSON the server keeps, so only there is a deep value valid
    where = "tracing" if ok else draw(st.sampled_from(sorted(_DEEP_PLACES)))
    before, after, base = _DEEP_PLACES[where]
    limit = 100 - base  # the most levels the nested value may have
    depth = draw(st.integers(1, limit)) if ok else draw(st.integers(limit + 1, max(limit + 1, max_depth)))
    with_ids = not ok and draw(st.integers(0, 19)) == 0
    nested = _nest(depth, draw(st.integers(0, 2)), with_ids)
    first = draw(st.booleans())
    head = f'{{"event_id":"{MARK}","type":"session.update",' if first else '{"type":"session.update",'
    tail = "}" if first else f',"event_id":"{MARK}"}}'
    raw = f'{head}"session":{{"type":"realtime","{where}":{before}{nested}{after}}}{tail}'
    if ok:
        return Frame("deep_ok", "ok", raw=raw)
    return Frame("deep_ids" if with_ids else "deep", "error", raw=raw, code="nesting_too_deep")


# ----------------------------------------------------------------------------- unicode


@functools.cache
@st.composite
def surrogate(draw: st.DrawFn, max_len: int = 200) -> Frame:
    """A lone surrogate (as a JSON escape) in some string: refused with invalid_value and its path."""
    bad = draw(text_surrogate())
    choice = draw(st.integers(0, 8))
    if choice == 0:
        return Frame("surrogate", "error", event={"type": "session.update", "session": {"instructions": bad}},
                     param="session.instructions", code="invalid_value")
    if choice == 1:
        return Frame("surrogate", "error", event={"type": _CIC, "item": _user_message(bad)},
                     param="item.content[0].text", code="invalid_value")
    if choice == 2:
        return Frame("surrogate", "error", event={"type": _CIC, "item": {**_user_message("x"), "id": bad}},
                     param="item.id", code="invalid_value")
    if choice == 3:
        return Frame("surrogate", "error", event={"type": "input_audio_buffer.clear", "event_id": MARK + bad},
                     keep_id=True, echo="scrub", param="event_id", code="invalid_value")
    if choice == 4:  # in an object key: the error names the object
        return Frame("surrogate", "error", event={"type": _RC, "response": {**_RESP, "metadata": {bad: "v"}}},
                     param="response.metadata", code="invalid_value")
    if choice == 5:
        return Frame("surrogate", "error", event={"type": "conversation.item.retrieve", "item_id": bad},
                     param="item_id", code="invalid_value")
    if choice == 6:
        return Frame("surrogate", "error", event={"type": "input_audio_buffer.append", "audio": bad},
                     param="audio", code="invalid_value")
    if choice == 7:
        return Frame("surrogate", "error", event={"type": bad}, param="type", code="invalid_value")
    return Frame("surrogate", "error", event={
        "type": "session.update", "session": {"tracing": {"metadata": {"k": [draw(text_ok(20)), bad]}}}},
        param="session.tracing.metadata.k[1]", code="invalid_value")


@functools.cache
@st.composite
def unicode_ok(draw: st.DrawFn, max_len: int = 2000, llm_text: int = LLM_TEXT) -> Frame:
    """Valid but awkward Unicode (NUL, RTL, emoji, long) where any text goes: must be accepted."""
    ascii_only = draw(st.booleans())
    if draw(st.integers(0, 9)) == 0:  # an escaped surrogate pair is one valid character
        return Frame("unicode_ok", "ok", raw='{"type":"session.update","session":{"instructions":'
                     f'"\\ud83d\\ude00 \\uD83C\\uDFF3"}},"event_id":"{MARK}"}}')
    if draw(st.booleans()):
        return Frame("unicode_ok", "ok", event={"type": "session.update", "session": draw(
            harmless_session_update(max_len))}, ascii=ascii_only)
    return Frame("unicode_ok", "ok", event={"type": _CIC, "item": draw(valid_item(llm_text, Fresh("item")))},
                 ascii=ascii_only)


# ----------------------------------------------------------------------------- ids and state


@functools.cache
def unknown_id(max_len: int = 200) -> st.SearchStrategy[str]:
    """Ids no session has: the prefix keeps them apart from server and Fresh ids."""
    return text_ok(max_len).map(lambda s: "unknown_" + s)


@functools.cache
@st.composite
def unknown_ids(draw: st.DrawFn, max_len: int = 200) -> Frame:
    uid = draw(unknown_id(max_len))
    choice = draw(st.integers(0, 5))
    if choice == 0:
        kind = draw(st.sampled_from(["conversation.item.retrieve", "conversation.item.delete"]))
        return Frame("unknown_id", "error", event={"type": kind, "item_id": uid}, param="item_id",
                     code="item_not_found")
    if choice == 1:
        return Frame("unknown_id", "error", event={
            "type": "conversation.item.truncate", "item_id": uid, "content_index": draw(st.integers(0, 10**20)),
            "audio_end_ms": draw(st.integers(0, 10**20))}, param="item_id", code="item_not_found")
    if choice == 2:
        return Frame("unknown_id", "error", event={"type": _CIC, "previous_item_id": uid, "item": _user_message("x")},
                     param="previous_item_id", code="item_not_found")
    if choice == 3:
        return Frame("unknown_id", "error", event={"type": "response.cancel", "response_id": uid},
                     param="response_id", code="response_not_found")
    if choice == 4:
        return Frame("unknown_id", "error", event={
            "type": _RC, "response": {**_RESP, "input": [{"type": "item_reference", "id": uid}]}},
            param="response.input[0].id", code="item_not_found")
    return Frame("unknown_id", "error", event={
        "type": _CIC, "item": {"type": "function_call_output", "call_id": uid, "output": "x"}},
        param="item.call_id", code="invalid_call_id")


@functools.cache
@st.composite
def item_ops(draw: st.DrawFn, max_len: int = LLM_TEXT) -> Frame:
    """Interleaved create / delete / truncate / retrieve on ids the session may or may not have."""
    ref = Ref("item", draw(st.integers(0, 50)))
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return Frame("item_create", "ok", event={"type": _CIC, "item": draw(valid_item(max_len, Fresh("item")))})
    if choice == 1:
        prev = draw(st.sampled_from([ref, "root"]))
        return Frame("item_create_after", "maybe", event={
            "type": _CIC, "previous_item_id": prev, "item": draw(valid_item(max_len, Fresh("item")))})
    if choice == 2:  # an id that may already exist
        return Frame("item_create_dup", "maybe", event={"type": _CIC, "item": draw(valid_item(max_len, ref))})
    if choice == 3:
        return Frame("item_delete", "maybe", event={"type": "conversation.item.delete", "item_id": ref})
    if choice == 4:
        return Frame("item_retrieve", "maybe", event={"type": "conversation.item.retrieve", "item_id": ref})
    if choice == 5:
        return Frame("item_truncate", "maybe", event={
            "type": "conversation.item.truncate", "item_id": ref, "content_index": draw(st.integers(0, 3)),
            "audio_end_ms": draw(st.one_of(st.integers(0, 5000), st.integers(0, 10**18)))})
    return Frame("call_output", "maybe", event={
        "type": _CIC, "item": {"type": "function_call_output", "call_id": Ref("call", draw(st.integers(0, 9))),
                               "output": draw(text_ok(100))}})


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@functools.cache
@st.composite
def audio_ops(draw: st.DrawFn) -> Frame:
    """input_audio_buffer append (garbage and real base64), commit, clear; output_audio_buffer.clear."""
    choice = draw(st.integers(0, 6))
    if choice == 0:  # a character outside the base64 alphabet
        junk = draw(st.text(_B64, max_size=20)) + draw(st.sampled_from("!*-_.~ \n\x00é")) + draw(st.text(_B64,
                                                                                                   max_size=20))
        return Frame("append_garbage", "error", event={"type": "input_audio_buffer.append", "audio": junk},
                     param="audio")
    if choice == 1:  # random text: may be base64 by chance, may have an odd byte count
        return Frame("append_text", "maybe", event={"type": "input_audio_buffer.append",
                                                    "audio": draw(st.text(_B64 + "=", max_size=40))})
    if choice == 2:  # real base64 of an even number of noise bytes: valid in every format
        n = draw(st.integers(0, 2400)) * 2
        data = draw(st.binary(min_size=min(n, 64), max_size=min(n, 64)))
        pcm = (data * (n // max(1, len(data)) + 1))[:n] if data else b"\0" * n
        return Frame("append_noise", "ok", event={"type": "input_audio_buffer.append",
                                                  "audio": base64.b64encode(pcm).decode()})
    if choice == 3:
        return Frame("commit", "maybe", event={"type": "input_audio_buffer.commit"})
    if choice == 4:
        return Frame("clear", "ok", event={"type": "input_audio_buffer.clear"})
    if choice == 5:
        return Frame("output_clear", "error", event={"type": "output_audio_buffer.clear"}, param="type",
                     code="unsupported_event")
    return Frame("unknown_type", "error", event={"type": draw(st.sampled_from(
        ["session.updated", "response.done", "x_event", "Session.Update", "session.update ", ""]))}, param="type")


# ----------------------------------------------------------------------------- responses


@functools.cache
@st.composite
def burst(draw: st.DrawFn, budget: int, llm_text: int = LLM_TEXT) -> list[Frame]:
    """response.create / response.cancel in quick succession (at most `budget` creates)."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, 5))):
        choice = draw(st.integers(0, 5))
        if choice <= 1 and budget > 0:
            budget -= 1
            frames.append(Frame("response_create", "maybe", event={"type": _RC, "response": draw(valid_response())},
                                starts_response=True, sync=draw(st.booleans())))
        elif choice == 2 and budget > 0:  # out of band: never refused, several may run at once
            budget -= 1
            frames.append(Frame("response_create_none", "ok", event={
                "type": _RC, "response": draw(valid_response("none"))}, starts_response=True,
                sync=draw(st.booleans())))
        elif choice == 3:
            frames.append(Frame("response_cancel", "maybe", event={"type": "response.cancel"}))
        elif choice == 4:
            frames.append(Frame("response_cancel_id", "maybe", event={
                "type": "response.cancel", "response_id": Ref("response", draw(st.integers(0, 9)))}))
        else:
            frames.append(draw(item_ops(llm_text)))
    return frames


# ----------------------------------------------------------------------------- plans


@functools.cache
@st.composite
def hostile_frame(draw: st.DrawFn, max_len: int = 2000, max_depth: int = 5000, llm_text: int = LLM_TEXT) -> Frame:
    """One hostile frame of any kind (weights: roughly what a broken or malicious client sends)."""
    weighted = [
        (12, malformed()), (18, wrong_type()), (6, unknown_parameter()), (5, missing_field()),
        (8, out_of_range()), (1, long_event_id()), (3, passthrough()), (5, deep(max_depth)), (8, surrogate()),
        (8, unicode_ok(max_len, llm_text)), (8, unknown_ids(max_len)), (12, item_ops(llm_text)), (9, audio_ops()),
    ]
    index = draw(st.sampled_from([i for i, (w, _) in enumerate(weighted) for _ in range(w)]))
    return draw(weighted[index][1])


@functools.cache
@st.composite
def session_plan(draw: st.DrawFn, max_frames: int = 40, max_responses: int = 3, max_len: int = 2000,
                 max_depth: int = 5000, min_frames: int = 1, llm_text: int = LLM_TEXT) -> list[Frame]:
    """Hostile frames with response bursts spliced in at random places.

    `max_len`: longest strings (in fields the model never reads); `llm_text`: longest text the model
    reads (message text), which is what makes responses slow.
    """
    frames = draw(st.lists(hostile_frame(max_len, max_depth, llm_text), min_size=min_frames, max_size=max_frames))
    budget = draw(st.integers(0, max_responses))
    while budget > 0:
        chunk = draw(burst(budget, llm_text))
        budget -= sum(f.starts_response for f in chunk) or 1
        at = draw(st.integers(0, len(frames)))
        frames[at:at] = chunk
    for frame in frames:
        frame.sync = frame.sync or draw(st.integers(0, 9)) == 0
    return frames


# ----------------------------------------------------------------------------- driver


@dataclass(slots=True)
class Known:
    """Ids the session has shown us (or we gave it), for Refs."""

    items: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    fresh: int = 0


@dataclass(slots=True)
class Sent:
    frame: Frame
    echo: str | None  # the event_id the error must carry (None: anonymous)
    text: str  # what was sent, for reports


@dataclass(slots=True)
class SessionReport:
    """What one fuzzed session did; `problems` lists every broken promise, with the frame sent."""

    events_sent: int = 0
    errors: int = 0
    server_errors: int = 0
    schema_failures: int = 0
    died: str | None = None
    responses_created: int = 0
    responses_done: int = 0
    final_status: str | None = None
    max_sync_s: float = 0.0
    input_tokens: list[int] = field(default_factory=list)  # of each response (prompt size)
    problems: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)


_EVENT_CLASSES = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls
                  for cls in typing.get_args(typing.get_args(RealtimeServerEvent)[0])}


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


def schema_detail(event: dict[str, Any]) -> str:
    """Why an event fails the SDK's types, from its own class (the union's message lists all 46)."""
    cls = _EVENT_CLASSES.get(event.get("type"))  # type: ignore[arg-type]
    if cls is None:
        return f"unknown server event type {event.get('type')!r}"
    try:
        _adapter(cls).validate_python(event, strict=True)
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {_short(e.get('input'), 80)})"
                         for e in exc.errors(include_url=False)[:5])
    return "valid alone, not in the union"


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class FuzzSession:
    """One WebSocket session under fuzz; `run()` returns its SessionReport and never raises."""

    def __init__(self, url: str, api_key: str, name: str, *, vad: bool = False, response_wait_s: float = 120,
                 final_tokens: int = 16, grace_s: float = 0.2):
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.name = name
        self.vad = vad
        self.response_wait_s = response_wait_s
        self.final_tokens = final_tokens
        self.grace_s = grace_s
        self.report = SessionReport()
        self.known = Known()
        self.sent: list[Sent] = []
        self.errors: dict[str | None, list[dict[str, Any]]] = {}
        self.created: list[str] = []
        self.done: Counter[str] = Counter()
        self.done_status: dict[str, str] = {}
        self.changed = asyncio.Event()
        self.session_created = False
        self.conversation: set[str] = set()  # ids of the items in the conversation now
        self._counter = 0
        self._ws: Any = None
        self._closing = False

    # ---- receiving

    def _on_event(self, event: dict[str, Any]) -> None:
        try:
            assert_valid_server_event(event)
        except ValidationError:
            self.report.schema_failures += 1
            self.report.problems.append(f"schema failure for {event.get('type')}: {schema_detail(event)}; "
                                        f"event {_short(json.dumps(event))}")
        kind = event.get("type")
        self.session_created = self.session_created or kind == "session.created"
        if kind == "error":
            error = event.get("error") or {}
            self.report.errors += 1
            self.errors.setdefault(error.get("event_id"), []).append(error)
            if "server_error" in (error.get("type"), error.get("code")):
                self.report.server_errors += 1
                self.report.problems.append(f"server_error: {_short(json.dumps(error))}")
        elif kind == "response.created":
            rid = event["response"]["id"]
            self.created.append(rid)
            self.known.responses.append(rid)
        elif kind == "response.done":
            response = event["response"]
            self.done[response["id"]] += 1
            self.done_status[response["id"]] = response.get("status")
            if response.get("usage"):
                self.report.input_tokens.append(response["usage"].get("input_tokens", 0))
            details = response.get("status_details") or {}
            if (details.get("error") or {}).get("type") == "server_error":
                self.report.server_errors += 1
                self.report.problems.append(f"response failed with a server_error: {_short(json.dumps(details))}")
        elif kind == "conversation.item.deleted":
            self.conversation.discard(event["item_id"])
        elif kind in ("conversation.item.added", "conversation.item.retrieved"):
            item = event["item"]
            if kind == "conversation.item.added":
                self.conversation.add(item["id"])
            if item.get("id") not in self.known.items:
                self.known.items.append(item["id"])
            if item.get("call_id"):
                self.known.calls.append(item["call_id"])
        self.changed.set()

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                self._on_event(json.loads(message))
        except websockets.ConnectionClosed as exc:
            if not self._closing:
                self.report.died = f"closed by the server: {exc}"
        if not self._closing and self.report.died is None:
            self.report.died = "closed by the server"
        self.changed.set()

    async def _until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.report.died is not None:
                return False
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True

    # ---- sending

    def _resolve(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: self._resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self._resolve(v) for v in node]
        if isinstance(node, Ref):
            pool = {"item": self.known.items, "response": self.known.responses, "call": self.known.calls}[node.kind]
            return pool[node.index % len(pool)] if pool else f"noref_{node.kind}_{node.index}"
        if isinstance(node, Fresh):
            self.known.fresh += 1
            value = f"fz_{node.kind}_{self.name}_{self.known.fresh}"[:64]
            (self.known.items if node.kind == "item" else self.known.calls).append(value)
            return value
        return node

    async def send(self, frame: Frame) -> Sent:
        self._counter += 1
        eid = f"{self.name}_{self._counter}"
        if frame.raw is not None:
            raw = frame.raw
            data: str | bytes = raw.replace(MARK.encode(), eid.encode()) if isinstance(raw, bytes) \
                else raw.replace(MARK, eid)
            shown = data if isinstance(data, str) else repr(data)
        else:
            assert frame.event is not None
            event = self._resolve(frame.event)
            if frame.keep_id:
                if isinstance(event.get("event_id"), str):
                    event["event_id"] = event["event_id"].replace(MARK, eid)
            else:
                event["event_id"] = eid
            text = json.dumps(event, ensure_ascii=frame.ascii)
            data = text.encode("utf-8", "surrogatepass") if frame.binary else text
            shown = text
        echo = {"id": eid, "none": None, "first512": None, "scrub": None}[frame.echo]
        if frame.echo == "first512":
            echo = (eid + "x" * 600)[:512]
        elif frame.echo == "scrub":
            echo = scrub(frame.event["event_id"].replace(MARK, eid)) if frame.event else None
        sent = Sent(frame, echo, shown)
        self.sent.append(sent)
        self.report.events_sent += 1
        self.report.kinds[frame.kind] += 1
        await self._ws.send(data)
        if frame.sync:
            await self.sync()
        return sent

    async def sync(self, label: str = "sync") -> bool:
        """A round trip: everything sent before has been handled once its error arrives."""
        frame = Frame(label, "error", event={"type": "conversation.item.retrieve", "item_id": "unknown_sync"},
                      param="item_id")
        start = time.monotonic()
        sent = await self.send(frame)
        ok = await self._until(lambda: sent.echo in self.errors, self.response_wait_s)
        self.report.max_sync_s = max(self.report.max_sync_s, time.monotonic() - start)
        if not ok and self.report.died is None:
            self.report.problems.append(f"no answer to a sync probe within {self.response_wait_s:.0f} s (wedged)")
        return ok

    # ---- the session

    async def run(self, frames: list[Frame]) -> SessionReport:
        """Connect, set the session up, send `frames`, settle, do a final text turn, check."""
        try:
            async with websockets.connect(self.url, additional_headers=self.headers, max_size=None,
                                          open_timeout=60, ping_timeout=120) as ws:
                await self.run_on(ws, frames)
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            if self.report.died is None:
                self.report.died = f"connection failed: {exc!r}"
        return self.finish()

    async def run_on(self, conn: Any, frames: list[Frame]) -> None:
        """`run` over any connection with `send(str | bytes)`, `close()` and async iteration of texts."""
        self._ws = conn
        reader = asyncio.create_task(self._read())
        try:
            await self._session(frames)
        finally:
            self._closing = True
            await conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 10)

    def finish(self) -> SessionReport:
        if self.report.died is not None:
            self.report.problems.append(f"session died: {self.report.died}")
        self.report.responses_created = len(self.created)
        self.report.responses_done = sum(self.done.values())
        return self.report

    async def _session(self, frames: list[Frame]) -> None:
        if not await self._until(lambda: self.session_created, 60):
            self.report.problems.append("no session.created")
        turn = {"type": "server_vad", "create_response": False} if self.vad else None
        await self.send(Frame("setup", "ok", event={"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"], "instructions": "Reply in a few words.",
            "audio": {"input": {"turn_detection": turn}}}}))
        for frame in frames:
            if self.report.died is not None:
                return
            if frame.kind == RESET:
                await self.reset()
            else:
                await self.send(frame)
        await self.settle()
        await self.final_turn()
        await self.settle()
        self.check()

    async def reset(self) -> None:
        """Delete every item (long runs: keeps prompts, and so the LLM's work, bounded)."""
        await self.sync("reset")
        for item_id in sorted(self.conversation):
            await self.send(Frame("reset", "maybe", event={"type": "conversation.item.delete", "item_id": item_id}))
        await self.sync("reset")

    async def settle(self) -> None:
        """Wait for every started response to end (they are known once the sync probe is answered)."""
        if not await self.sync("sentinel"):
            return
        expected = self.expected_responses()
        ok = await self._until(lambda: len(self.created) >= expected and sum(self.done.values()) >= len(self.created),
                               self.response_wait_s)
        if not ok and self.report.died is None:
            self.report.problems.append(
                f"wedged: {expected} response.create accepted, {len(self.created)} response.created, "
                f"{sum(self.done.values())} response.done after {self.response_wait_s:.0f} s")
        await asyncio.sleep(self.grace_s)  # a duplicate response.done would arrive by now

    def expected_responses(self) -> int:
        return sum(1 for s in self.sent if s.frame.starts_response and not self.errors.get(s.echo))

    async def final_turn(self) -> None:
        """A normal text turn after the fuzzing: it must complete."""
        await self.send(Frame("final", "ok", event={"type": "session.update", "session": {
            "type": "realtime", "instructions": "Reply in a few words.", "truncation": "auto", "tools": [],
            "tool_choice": "auto", "output_modalities": ["text"]}}))
        await self.send(Frame("final", "ok", event={"type": _CIC, "item": _user_message("Say hello.")}))
        before = len(self.created)
        await self.send(Frame("final", "ok", event={"type": _RC, "response": {
            "output_modalities": ["text"], "max_output_tokens": self.final_tokens}}, starts_response=True))
        if await self._until(lambda: len(self.created) > before and self.done.get(self.created[before], 0) > 0,
                             self.response_wait_s):
            self.report.final_status = self.done_status[self.created[before]]
            if self.report.final_status not in ("completed", "incomplete"):
                self.report.problems.append(f"the final text turn ended {self.report.final_status}")
        elif self.report.died is None:
            self.report.problems.append("the final text turn did not finish")

    def check(self) -> None:
        """Compare what arrived with what each frame was owed."""
        problems = self.report.problems
        anonymous_sent = 0
        for i, sent in enumerate(self.sent):
            frame = sent.frame
            where = f"frame {i} ({frame.kind}, expect {frame.expect}): {_short(sent.text)}"
            if sent.echo is None:
                anonymous_sent += 1
                continue
            got = self.errors.get(sent.echo, [])
            if len(got) > 1:
                problems.append(f"{len(got)} errors for one event: {where}; errors {_short(json.dumps(got))}")
            if frame.expect == "error" and not got:
                problems.append(f"no error for a bad event: {where}")
            if frame.expect == "ok" and got:
                problems.append(f"error for a valid event: {where}; error {_short(json.dumps(got[0]))}")
            if frame.expect == "error" and got:
                error = got[0]
                if frame.param is not None and error.get("param") != frame.param:
                    problems.append(f"param {error.get('param')!r}, expected {frame.param!r}: {where}")
                if frame.code is not None and error.get("code") != frame.code:
                    problems.append(f"code {error.get('code')!r}, expected {frame.code!r}: {where}")
        anonymous = len(self.errors.get(None, []))
        if anonymous != anonymous_sent:
            problems.append(f"{anonymous} errors without event_id for {anonymous_sent} frames whose event_id "
                            f"cannot be read: {_short(json.dumps(self.errors.get(None, [])))}")
        echoes = {s.echo for s in self.sent}
        strangers = [eid for eid in self.errors if eid is not None and eid not in echoes]
        if strangers:
            problems.append(f"errors naming event_ids never sent: {_short(strangers)}")
        for rid in self.created:
            if self.done.get(rid, 0) != 1:
                problems.append(f"response {rid} got {self.done.get(rid, 0)} response.done")
        for rid in self.done:
            if rid not in self.created:
                problems.append(f"response.done for {rid} without response.created")
        expected = self.expected_responses()
        if len(self.created) != expected:
            problems.append(f"{expected} response.create accepted but {len(self.created)} response.created")


class Heartbeat:
    """A separate session answering a cheap event every `interval_s`, in its own thread and loop:
    its worst round trip is how long the server's event loop stalled (starvation)."""

    def __init__(self, url: str, api_key: str, interval_s: float = 0.1):
        self.url = url
        self.api_key = api_key
        self.interval_s = interval_s
        self.rtts: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="fuzz-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def worst_s(self) -> float:
        return max(self.rtts, default=0.0)

    async def _run(self) -> None:
        try:
            async with websockets.connect(self.url, additional_headers={"Authorization": f"Bearer {self.api_key}"},
                                          max_size=None, open_timeout=60, ping_timeout=120) as ws:
                await ws.recv()  # session.created
                n = 0
                while not self._stop.is_set():
                    n += 1
                    eid = f"hb_{n}"
                    start = time.monotonic()
                    await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "hb",
                                              "event_id": eid}))
                    while True:
                        event = json.loads(await asyncio.wait_for(ws.recv(), 300))
                        if event.get("type") == "error" and event["error"].get("event_id") == eid:
                            break
                    self.rtts.append(time.monotonic() - start)
                    await asyncio.sleep(self.interval_s)
        except Exception as exc:  # reported, not raised: the caller asserts on it
            self.error = repr(exc)


def ws_url(base_ws_url: str) -> str:
    return f"{base_ws_url}/v1/realtime?model=gpt-realtime"
