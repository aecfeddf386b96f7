"""protocol.limits: hostile JSON becomes a ProtocolError, never a RecursionError or a crash."""

from __future__ import annotations

import json
import sys
import time

import pytest

from openrealtime.protocol.errors import ProtocolError
from openrealtime.protocol.limits import MAX_JSON_DEPTH, check_depth, loads_limited


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_ordinary_documents_parse() -> None:
    event = {"type": "input_audio_buffer.append", "audio": "A" * 100_000, "event_id": "e1"}
    assert loads_limited(json.dumps(event)) == event
    assert loads_limited(json.dumps(event).encode()) == event
    assert loads_limited(bytearray(b"[1, 2]")) == [1, 2]
    assert loads_limited('"text"') == "text"
    assert loads_limited(b"\xef\xbb\xbf{}") == {}  # a UTF-8 BOM, as json.loads(bytes) accepts


@pytest.mark.parametrize("depth", [1, 2, MAX_JSON_DEPTH])
def test_depth_up_to_the_limit_is_accepted(depth: int) -> None:
    assert loads_limited(nested(depth)) is not None
    assert loads_limited(nested_objects(depth)) is not None


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 5000, 200_000])
@pytest.mark.parametrize("make", [nested, nested_objects])
def test_deeper_than_the_limit_is_refused(depth: int, make) -> None:
    with pytest.raises(ProtocolError) as info:
        loads_limited(make(depth))
    assert info.value.code == "nesting_too_deep"
    assert info.value.param is None
    assert info.value.type == "invalid_request_error"


def test_past_the_interpreters_recursion_limit_is_a_protocol_error() -> None:
    # Deeper than json.loads itself can go: its RecursionError must not escape.
    depth = sys.getrecursionlimit() * 3
    with pytest.raises(ProtocolError) as info:
        loads_limited(nested(depth).encode())
    assert info.value.code == "nesting_too_deep"


def test_a_custom_limit_applies() -> None:
    assert loads_limited(nested(3), max_depth=3) == [[[]]]
    with pytest.raises(ProtocolError):
        loads_limited(nested(4), max_depth=3)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 10_000 + "{" * 10_000})
    assert loads_limited(text) == {"a": "[" * 10_000 + "{" * 10_000}


@pytest.mark.parametrize("raw", ["", "{", "nope", "{'a': 1}", b"\xff\xfe\xfa", "[1,]", "NaN]"])
def test_invalid_json_is_refused(raw: str | bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        loads_limited(raw)
    assert info.value.code == "invalid_json"
    assert info.value.param is None


def test_check_depth_on_parsed_data() -> None:
    check_depth({"a": [1, {"b": None}]})
    check_depth("scalar")
    check_depth([], max_depth=1)
    with pytest.raises(ProtocolError):
        check_depth([], max_depth=0)
    deep: list = []
    for _ in range(50_000):  # far deeper than recursion could walk
        deep = [deep]
    with pytest.raises(ProtocolError) as info:
        check_depth(deep)
    assert info.value.code == "nesting_too_deep"
    wide = {"k": [[1]] * 100_000}  # wide is fine: only depth counts
    check_depth(wide)
    check_depth(({"t": (1,)},), max_depth=3)
    with pytest.raises(ProtocolError):
        check_depth(({"t": (1,)},), max_depth=2)


def test_deep_documents_are_refused_quickly() -> None:
    start = time.perf_counter()
    for _ in range(20):
        with pytest.raises(ProtocolError):
            loads_limited(nested(1_000_000))
    assert time.perf_counter() - start < 5.0
