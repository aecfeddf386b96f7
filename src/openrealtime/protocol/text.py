"""Text that is safe on every wire: no lone UTF-16 surrogates in, always encodable UTF-8 out.

JSON lets a client write `"\\ud800"`; Python decodes it to a str that cannot be encoded as UTF-8.
Such a string would break the data-channel send (ending a WebRTC call) or the LLM's tokenizer
(failing every later response), so client events with one are refused, and anything we serialize
falls back to ASCII escapes rather than failing.
"""

from __future__ import annotations

import json
import re
from typing import Any


def _bad(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def find_lone_surrogate(data: Any) -> str | None:
    """The wire path of the first string (or key) holding a lone surrogate, or None; iterative."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if _bad(node):
                return path or None
        elif isinstance(node, dict):
            for key, value in node.items():
                key_path = f"{path}.{key}" if path else str(key)
                if _bad(key):
                    return path or "(key)"
                stack.append((value, key_path))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node))
    return None


def scrub(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (for echoing client input in messages)."""
    if not _bad(text):
        return text
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def dumps_event(event: dict[str, Any]) -> str:
    """Compact JSON for the wire; escapes non-ASCII only when the text holds a lone surrogate."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    if _bad(text):
        text = json.dumps(event, ensure_ascii=True, separators=(",", ":"))
    return text


_EVENT_ID = re.compile(r'"event_id"\s*:\s*"((?:[^"\\]|\\.){0,512})"')
_STRUCTURE = re.compile(r'[{}\[\]"\\]')
# How much of an unparseable document is searched for its event_id.
_SCAN_CHARS = 65536


def top_level_event_id(raw: str | bytes) -> str | None:
    """The `event_id` of an event refused for its nesting, so that its error can name it.

    Documents that `json` can still parse give it directly. Deeper ones (where `json` recurses out)
    are scanned linearly over their first and last 64 KiB for a `"event_id": "..."` at depth 1
    (where clients put it); in between, the error goes without an id rather than costing more time.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        value = data.get("event_id")
        return scrub(value)[:512] if isinstance(value, str) else None
    full = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
    text = full[:_SCAN_CHARS]
    depth, in_string = 0, False
    structure = _STRUCTURE.finditer(text)
    pending = None  # the next structural character not yet applied
    for match in _EVENT_ID.finditer(text):
        # advance the bracket/string state up to the candidate, never re-reading earlier text
        while True:
            if pending is None:
                pending = next(structure, None)
            if pending is None or pending.start() >= match.start():
                break
            ch = pending.group()
            if in_string:
                if ch == "\\":
                    nxt = next(structure, None)  # the escaped character, if structural, is skipped
                    if nxt is not None and nxt.start() != pending.start() + 1:
                        pending = nxt
                        continue
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
            pending = None
        if depth == 1 and not in_string:
            return _decoded(match)
    return _tail_event_id(full[-_SCAN_CHARS:])


def _decoded(match: re.Match[str]) -> str | None:
    try:
        value = json.loads(f'"{match.group(1)}"')
    except ValueError:
        return None
    return scrub(value)[:512] if isinstance(value, str) else None


def _tail_event_id(tail: str) -> str | None:
    """The same search from the end of the document backwards (`event_id` written last)."""
    candidates = list(_EVENT_ID.finditer(tail))
    structure = [m.start() for m in _STRUCTURE.finditer(tail)]
    depth, in_string = 0, False
    k = len(structure) - 1
    for match in reversed(candidates):
        while k >= 0 and structure[k] >= match.end():
            i = structure[k]
            ch = tail[i]
            k -= 1
            if ch == '"':
                slashes = 0
                while i - slashes - 1 >= 0 and tail[i - slashes - 1] == "\\":
                    slashes += 1
                if slashes % 2 == 0:
                    in_string = not in_string
            elif in_string or ch == "\\":
                continue
            elif ch in "}]":
                depth += 1
            elif ch in "{[":
                depth -= 1
        if depth == 1 and not in_string:
            return _decoded(match)
    return None
