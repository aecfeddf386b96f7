"""Bounds on client-supplied JSON, so a hostile body cannot exhaust the stack or the CPU.

``json.loads`` itself recurses in C and raises ``RecursionError`` on very deep input, and pydantic
and our own walkers recurse in Python; a document nested a few thousand levels deep would crash a
handler (a 500) or an event loop task. Every place that parses client JSON goes through
``loads_limited`` (or ``check_depth`` for data parsed elsewhere) and gets a ``ProtocolError`` — a
4xx / ``error`` event in the OpenAI shape — instead.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ProtocolError

# Far deeper than any real Realtime event or REST body (a few levels plus a tool schema), far
# shallower than what recursion in json / pydantic / our walkers can handle.
MAX_JSON_DEPTH = 100


def _too_deep(max_depth: int) -> ProtocolError:
    return ProtocolError(f"JSON nesting is deeper than the maximum of {max_depth} levels.",
                         code="nesting_too_deep", param=None)


def check_depth(obj: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ``ProtocolError(code="nesting_too_deep")`` if containers nest deeper than ``max_depth``.

    Iterative (an explicit stack), so checking a pathological value cannot itself overflow. A
    scalar is depth 0, ``[]`` / ``{}`` depth 1. Only dicts, lists and tuples count as containers.
    """
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        depth += 1
        if depth > max_depth:
            raise _too_deep(max_depth)
        stack.extend((child, depth) for child in children
                     if isinstance(child, (dict, list, tuple)))


def loads_limited(raw: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse client JSON, raising ``ProtocolError`` instead of crashing on hostile input.

    Codes: ``invalid_json`` for text that is not JSON (including invalid UTF-8), and
    ``nesting_too_deep`` for documents nested deeper than ``max_depth``.
    """
    if isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    # Fast path: a document cannot nest deeper than its number of opening brackets (counted in C,
    # cheap even for megabytes of base64 audio), so most events skip the tree walk entirely.
    opening = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) \
        else raw.count("[") + raw.count("{")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ProtocolError(f"We could not parse the JSON body of your request: {exc}.",
                            code="invalid_json", param=None) from None
    if opening > max_depth:
        check_depth(value, max_depth)
    return value
