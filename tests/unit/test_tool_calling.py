"""Schema-guided decoding, the tool-call parser and scanner, and tool prompts (no model needed)."""

from __future__ import annotations

import json
import string

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrealtime.backends.llm import ChatMessage, ToolCall, ToolSpec
from openrealtime.backends.tool_calling import (
    ANOTHER_CALL_THRESHOLD,
    MAX_DELTA_CHARS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESULT_HINT,
    TOOL_USE_RULE,
    CallScanner,
    GuidedDecoder,
    NameGuard,
    TokenVocab,
    answered_calls,
    call_key,
    call_probability,
    drive,
    generic_tools_prompt,
    grounded,
    minimal_value,
    name_probabilities,
    name_stem,
    parse_tool_calls,
    template_messages,
    template_supports_tools,
    with_tool_rule,
)

from .fake_lm import FakeLM


def softmax_sampler(seed: int):
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        p = np.exp(logits - logits.max())
        return int(rng.choice(len(p), p=p / p.sum()))
    return sample


def run(schema: dict, seed: int = 0, budget: int = 10_000, quote_bias: float = 2.0
        ) -> tuple[list[str], FakeLM, GuidedDecoder]:
    """Guided output for `schema` (its deltas), the whole of it committed without evaluating the end."""
    lm = FakeLM(seed, budget=budget, quote_bias=quote_bias)
    guide = GuidedDecoder(lm, lm.vocab, softmax_sampler(seed))
    out: list[str] = []
    drive(guide.json_value(schema, out.append))
    guide.finish()
    return out, lm, guide


def decode(schema: dict, seed: int = 0, budget: int = 10_000, quote_bias: float = 2.0) -> tuple[str, FakeLM]:
    lm = FakeLM(seed, budget=budget, quote_bias=quote_bias)
    guide = GuidedDecoder(lm, lm.vocab, softmax_sampler(seed))
    out: list[str] = []
    drive(guide.json_value(schema, out.append))
    drive(guide.flush())
    return "".join(out), lm


# ---------------------------------------------------------------- random schemas of the supported subset

NAMES = st.text(alphabet=string.ascii_letters + "_é", min_size=1, max_size=8)
ENUM_STR = st.text(alphabet=string.ascii_letters + " -", min_size=0, max_size=10)


def leaves() -> st.SearchStrategy[dict]:
    strings = st.builds(
        lambda lo, extra: {"type": "string", **({"minLength": lo} if lo else {}),
                           **({"maxLength": lo + extra} if extra is not None else {})},
        st.integers(0, 4), st.one_of(st.none(), st.integers(0, 12)))
    ints = st.one_of(
        st.just({"type": "integer"}),
        st.just({"type": "integer", "minimum": 0}),
        st.builds(lambda lo, k: {"type": "integer", "minimum": lo, "maximum": lo + k},
                  st.integers(-50, 50), st.integers(0, 20)),
    )
    return st.one_of(
        strings, ints,
        st.just({"type": "number"}), st.just({"type": "number", "minimum": 0}),
        st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.just({"type": ["string", "null"]}),
        st.lists(ENUM_STR, min_size=1, max_size=5, unique=True).map(lambda v: {"type": "string", "enum": v}),
        st.lists(st.integers(-1000, 1000), min_size=1, max_size=5, unique=True).map(lambda v: {"enum": v}),
        st.sampled_from([{"const": "fixed"}, {"const": 3}, {}, {"description": "anything"}]),
    )


def composite(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    def obj(props: dict[str, dict], required: list[bool], extra: bool) -> dict:
        req = [k for k, r in zip(props, required, strict=False) if r]
        out = {"type": "object", "properties": props, "required": req}
        if extra:
            out["additionalProperties"] = False
        return out

    objects = st.dictionaries(NAMES, children, max_size=4).flatmap(
        lambda props: st.builds(obj, st.just(props), st.lists(st.booleans(), min_size=len(props),
                                                                  max_size=len(props)), st.booleans()))
    arrays = st.builds(
        lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo,
                                  **({"maxItems": lo + extra} if extra is not None else {})},
        children, st.integers(0, 2), st.one_of(st.none(), st.integers(0, 3)))
    any_of = st.lists(children, min_size=1, max_size=3).map(lambda opts: {"anyOf": opts})
    return st.one_of(objects, arrays, any_of)


SCHEMAS = st.recursive(leaves(), composite, max_leaves=12)
TOP = st.dictionaries(NAMES, SCHEMAS, max_size=5).flatmap(
    lambda props: st.builds(lambda req: {"type": "object", "properties": props,
                                         "required": [k for k, r in zip(props, req, strict=False) if r]},
                            st.lists(st.booleans(), min_size=len(props), max_size=len(props))))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=TOP, seed=st.integers(0, 2**16), bias=st.sampled_from([-2.0, 0.0, 3.0]))
def test_guided_output_always_parses_and_validates(schema: dict, seed: int, bias: float):
    text, lm = decode(schema, seed, quote_bias=bias)
    value = json.loads(text)
    jsonschema.validate(value, schema)
    # What the model saw is exactly what was emitted (all evaluated tokens spell the JSON).
    assert lm.detok() == text


def minimal_tokens(lm: FakeLM, schema: dict) -> int:
    return len(lm.tokenize(json.dumps(minimal_value(schema), ensure_ascii=False)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=TOP, seed=st.integers(0, 2**16), budget=st.integers(0, 60))
def test_the_budget_holds_and_a_value_that_fits_completes(schema: dict, seed: int, budget: int):
    out, lm, guide = run(schema, seed, budget=budget)
    text = "".join(out)
    # Every token of the output counts, forced or sampled, evaluated or not.
    assert len(lm.evaluated) + lm.spent <= budget
    # What the model saw was shown (but for a choice the budget cut short), and what was shown
    # beyond it was counted without being evaluated.
    seen = lm.detok()
    assert text.startswith(seen) or (guide.truncated and seen.startswith(text))
    assert len(lm.tokenize(text[len(seen):])) <= lm.spent + 1
    if budget >= minimal_tokens(lm, schema):
        # The decoder kept room to close everything: valid, complete, within the budget.
        assert not guide.truncated
        jsonschema.validate(json.loads(text), schema)
    elif guide.truncated:
        assert lm.room() < minimal_tokens(lm, schema)
    else:
        jsonschema.validate(json.loads(text), schema)  # the model happened to finish in time


def test_refs_and_nested_definitions():
    schema = {
        "type": "object",
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"]}},
        "properties": {"a": {"$ref": "#/$defs/Point"}, "path": {"type": "array", "items": {"$ref": "#/$defs/Point"}}},
        "required": ["a", "path"],
    }
    for seed in range(20):
        text, _ = decode(schema, seed)
        jsonschema.validate(json.loads(text), schema)


def test_minimal_values_validate():
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 3}, "n": {"type": "integer", "minimum": 5},
        "arr": {"type": "array", "items": {"type": "boolean"}, "minItems": 2},
        "e": {"enum": ["a", "b"]}, "o": {"type": "object", "properties": {"z": {"type": "null"}}, "required": ["z"]}},
        "required": ["s", "n", "arr", "e", "o"]}
    jsonschema.validate(minimal_value(schema), schema)


def test_tool_call_block_is_canonical_and_chooses_among_tools():
    tools = [ToolSpec("get_weather", "w", {"type": "object", "properties": {"city": {"type": "string"}},
                                           "required": ["city"]}),
             ToolSpec("get_time", "t", None)]
    for seed in range(10):
        lm = FakeLM(seed, quote_bias=3)
        guide = GuidedDecoder(lm, lm.vocab, softmax_sampler(seed))
        seen: dict[str, list[str]] = {}

        def on_name(name: str, seen=seen):
            seen[name] = []
            return seen[name].append

        drive(guide.tool_call(tools, None, on_name))
        guide.force("}\n" + TOOL_CALL_CLOSE, emit=False)
        drive(guide.flush())
        [(name, parts)] = seen.items()
        parsed = parse_tool_calls(lm.detok())
        assert not parsed.errors and parsed.text.strip() == ""
        assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [(name, json.loads("".join(parts)))]
        assert all(0 < len(p) <= MAX_DELTA_CHARS for p in parts)
        spec = next(t for t in tools if t.name == name)
        jsonschema.validate(json.loads("".join(parts)), spec.parameters or {"type": "object"})
    # A named choice is always that function.
    lm = FakeLM(1)
    guide = GuidedDecoder(lm, lm.vocab, softmax_sampler(1))
    names: list[str] = []
    drive(guide.tool_call(tools, "get_time", lambda n: (names.append(n), lambda _t: None)[1]))
    assert names == ["get_time"]


# ---------------------------------------------------------------- hostile schemas and the budget


def test_huge_min_length_is_cut_at_the_budget_in_small_deltas():
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 10_000_000}}, "required": ["s"]}
    out, lm, guide = run(schema, budget=50)
    assert guide.truncated and lm.room() == 0
    text = "".join(out)
    assert text.startswith('{"s": "') and len(text) < 50 * max(len(t) for t in lm.texts)
    assert max(len(d) for d in out) <= MAX_DELTA_CHARS


@pytest.mark.parametrize("items", [{"type": "string"}, {"type": "array", "items": {}, "minItems": 100_000},
                                   {"const": "fixed"}, {"type": "object", "properties": {}}])
def test_huge_min_items_is_cut_at_the_budget(items: dict):
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": items, "minItems": 100_000}},
              "required": ["xs"]}
    out, lm, guide = run(schema, budget=200)
    assert guide.truncated and len(lm.evaluated) + lm.spent == 200
    assert "".join(out).startswith('{"xs": [')
    assert max(len(d) for d in out) <= MAX_DELTA_CHARS and len(out) <= 200


def test_huge_const_streams_in_pieces():
    big = "abc" * 1_000_000
    out, lm, guide = run({"type": "object", "properties": {"c": {"const": big}}, "required": ["c"]}, budget=3000)
    text = "".join(out)
    assert guide.truncated and lm.room() == 0 and max(len(d) for d in out) <= MAX_DELTA_CHARS
    assert big.startswith(text[len('{"c": "'):]) and len(text) > 1000


def test_enum_of_huge_values_is_cut_without_building_them_whole():
    huge = ["a" * 2_000_000, "b" * 3_000_000]
    out, lm, guide = run({"type": "object", "properties": {"e": {"enum": huge}}, "required": ["e"]}, budget=100)
    assert guide.truncated and lm.room() == 0
    assert "".join(out).startswith('{"e": "a') and max(len(d) for d in out) <= MAX_DELTA_CHARS


def test_tight_budget_closes_values_early_and_stays_valid():
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 3}, "tags": {"type": "array", "items": {"type": "string"}},
        "n": {"type": "integer", "minimum": 4}, "opt": {"type": "string"}}, "required": ["name", "tags", "n"]}
    lm = FakeLM(0)
    need = minimal_tokens(lm, schema)
    squeezed = 0
    for seed in range(20):
        out, lm, guide = run(schema, seed, budget=need + 3, quote_bias=-3)  # the model likes long strings
        jsonschema.validate(json.loads("".join(out)), schema)
        assert len(lm.evaluated) + lm.spent <= need + 3 and not guide.truncated
        squeezed += guide.squeezes
    assert squeezed


def test_decoding_pauses_before_every_evaluation():
    lm = FakeLM(3, quote_bias=1)
    guide = GuidedDecoder(lm, lm.vocab, softmax_sampler(3))
    steps = guide.json_value({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                              "required": ["a", "b"]}, lambda _t: None)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration:
            break
        pauses += 1
        assert lm.pauses == pauses  # paused inside the evaluation, before the model ran
    assert pauses == guide.evaluations > 1


# ---------------------------------------------------------------- parsing and scanning


def test_parse_tool_calls_text_calls_and_malformed_blocks():
    out = parse_tool_calls(
        'Sure.<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
        '<tool_call>{"name": "b", "parameters": "{\\"y\\": 2}"}</tool_call>'
        "<tool_call>{not json}</tool_call> tail <tool_call>{\"name\": \"c\", \"arguments\": {}}")
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("a", {"x": 1}), ("b", {"y": 2}), ("c", {})]
    assert out.text.startswith("Sure.") and "{not json}" in out.text and len(out.errors) == 1
    assert parse_tool_calls("no calls here").text == "no calls here"
    assert parse_tool_calls('<tool_call>{"name": "x", "arguments": [1]}</tool_call>').errors


@pytest.mark.parametrize("pieces", [
    ["Hello ", "<", "tool", "_call", ">", "\n{"],
    ["Hello <tool_call>", "\n"],
    ["Hello <to", "ol_call>"],
])
def test_scanner_finds_the_marker_and_holds_back_its_start(pieces: list[str]):
    scanner = CallScanner()
    shown, opening = "", None
    for piece in pieces:
        text, opening = scanner.push(piece)
        shown += text
        if opening is not None:
            break
    assert shown == "Hello " and opening == len("Hello ")


def test_scanner_releases_text_that_is_not_a_call():
    scanner = CallScanner()
    out = "".join(scanner.push(p)[0] for p in ["a <", "b", " {", '"x": 1}'])
    assert out == 'a <b {"x": 1}'
    assert scanner.flush() == ""
    scanner = CallScanner()
    assert scanner.push("3 <tool")[0] == "3 "
    assert scanner.flush() == "<tool"


@pytest.mark.parametrize("pieces", [['{"', "name", '":', ' "'], ["  ", "```json\n", '{\n  "name": "']])
def test_scanner_takes_a_bare_json_call(pieces: list[str]):
    scanner = CallScanner()
    results = [scanner.push(p) for p in pieces]
    assert all(text == "" for text, _ in results)
    assert results[-1][1] == len(scanner.text) - len(scanner.text.lstrip())
    # Later in the reply too (the text before it is shown), in a fence or with doubled braces.
    later = CallScanner()
    assert later.push("Hi. ")[0] == "Hi. " and later.push('{"name": "')[1] == 4
    fenced = CallScanner()
    out = [fenced.push(p) for p in ["Use this:\n", "``", "`json\n{", '{"name', '": "']]
    assert "".join(t for t, _ in out) == "Use this:\n" and out[-1][1] == len("Use this:\n")


def test_scanner_looks_for_calls_after_a_rejected_bare_opening():
    scanner = CallScanner()
    assert scanner.push('{"name": "')[1] == 0
    assert scanner.reject_bare() == '{"name": "'
    assert scanner.push('Bob"} and ')[0] == 'Bob"} and '
    assert scanner.push('{"name": "')[1] == len('{"name": "Bob"} and ')


# ---------------------------------------------------------------- prompts


TOOLS = [ToolSpec("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})]
CONVERSATION = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=[ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                                             ToolCall("call_2", "get_weather", '{"city": "Lyon"}')]),
    ChatMessage("tool", "sunny", tool_call_id="call_1"),
    ChatMessage("tool", "rainy", tool_call_id="call_2"),
]


def test_generic_prompt_rewrites_tools_calls_and_results():
    msgs, tool_var = template_messages(CONVERSATION, TOOLS, native=False)
    assert tool_var is None
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2]["content"].count(TOOL_CALL_OPEN) == 2 and '{"city": "Lyon"}' in msgs[2]["content"]
    assert msgs[3]["content"] == ("<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>\n"
                                  + TOOL_RESULT_HINT)
    # No system message: one is added for the tools; no tools: no section.
    msgs, _ = template_messages(CONVERSATION[1:2], TOOLS, native=False)
    assert msgs[0]["role"] == "system" and msgs[0]["content"] == generic_tools_prompt(TOOLS)
    msgs, _ = template_messages(CONVERSATION[:2], [], native=False)
    assert msgs[0]["content"] == "Be brief."


def test_native_prompt_passes_structured_calls():
    msgs, tool_var = template_messages(CONVERSATION, TOOLS, native=True)
    assert tool_var == [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                                          "parameters": TOOLS[0].parameters}}]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert msgs[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_chat_template_renders_tools_natively_or_generically():
    from openrealtime.backends.llamacpp import ChatTemplate

    native_source = (
        "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
        "</tool_call>{% endfor %}{% endfor %}"
    )
    assert template_supports_tools(native_source)
    native = ChatTemplate(native_source)
    text = native.render(CONVERSATION, tools=TOOLS)
    assert text.startswith('<tools>{"type": "function"') and '<tool_call>get_weather {"city": "Paris"}' in text
    generic = ChatTemplate(None)  # ChatML fallback: no tool support
    assert not generic.native_tools
    text = generic.render(CONVERSATION, tools=TOOLS)
    assert "# Tools" in text and "<|im_start|>user\n<tool_response>\nsunny" in text
    assert "<|im_start|>tool" not in text


def test_bare_opening_must_name_a_tool():
    from openrealtime.backends.tool_calling import could_start_name

    names = ["get_weather", "get_time"]
    assert could_start_name("get", names) and could_start_name("get_time", names)
    assert could_start_name('get_time", "arguments"', names)
    assert not could_start_name("Bob", names) and not could_start_name(" get", names)
    scanner = CallScanner()
    for piece in ['{"', "name", '": "', "Bo"]:
        _, opening = scanner.push(piece)
        if opening is not None:
            break
    assert opening == 0 and scanner.bare and scanner.after_bare_opening() == ""
    scanner.push("Bob")
    assert scanner.after_bare_opening() == "Bob"
    held = scanner.reject_bare()
    assert held.startswith('{"name": "') and not scanner.bare
    assert scanner.push('", "age": 3}') == ('", "age": 3}', None)


# ---------------------------------------------------------------- deciding to call, repeats


QWEN_STYLE = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n{...}\n</tools>\n\nFor each function call:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
)


def test_tool_rule_closes_the_system_turn_and_the_call_format_has_single_braces():
    fixed = with_tool_rule(QWEN_STYLE)
    assert '{"name": <function-name>, "arguments": <args-json-object>}\n' in fixed and "{{" not in fixed
    system = fixed.split("<|im_end|>")[0]
    assert system.endswith("</tool_call>\n" + TOOL_USE_RULE)
    assert with_tool_rule(fixed) == fixed
    result = "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
    assert with_tool_rule(result).endswith(f"</tool_response>\n{TOOL_RESULT_HINT}<|im_end|>\n")
    assert with_tool_rule("<|im_start|>user\nHi<|im_end|>\n") == "<|im_start|>user\nHi<|im_end|>\n"
    assert generic_tools_prompt(TOOLS).endswith(TOOL_USE_RULE)


def test_call_key_ignores_key_order_and_spacing():
    assert call_key("f", '{"a": 1, "b": "x"}') == call_key("f", '{"b":"x","a":1}')
    assert call_key("f", '{"a": 1}') != call_key("g", '{"a": 1}')
    assert call_key("f", "") == call_key("f", "{}")
    assert call_key("f", "not json ") == ("f", "not json")


def test_answered_calls_are_those_with_outputs_since_the_user_spoke():
    paris = ToolCall("c1", "get_weather", '{"city": "Paris"}')
    lyon = ToolCall("c2", "get_weather", '{"city": "Lyon"}')
    history = [
        ChatMessage("user", "Weather in Paris and Lyon?"),
        ChatMessage("assistant", "", tool_calls=[paris, lyon]),
        ChatMessage("tool", "sunny", tool_call_id="c1"),  # Lyon has no output yet
    ]
    assert answered_calls(history) == {call_key("get_weather", '{"city":"Paris"}')}
    assert answered_calls([*history, ChatMessage("user", "And Rome?")]) == set()


def test_call_start_tokens_cover_every_call_form():
    lm = FakeLM()
    starts = {lm.texts[t] for t in lm.vocab.call_start}
    assert {"{", "`", "<", '{"', " {\"", "<tool_call>", " ", "\n\n"} <= starts
    assert not starts & {"a", "Paris", "</tool_call>"[1:], '"', "}"}
    logits = np.full(len(lm.vocab.pieces), -np.inf, dtype=np.float32)
    logits[lm.tokenize("Paris")[0]] = 0.0
    assert call_probability(logits, lm.vocab) == 0.0
    logits[lm.tokenize('{"')[0]] = 0.0
    assert call_probability(logits, lm.vocab) == pytest.approx(0.5)


def _after_call(lm: FakeLM, p_more: float) -> bool:
    """another_call with the model putting `p_more` on opening a call after the closing tag."""
    other, opening = lm.tokenize("a")[0], lm.tokenize("{")[0]

    def logits() -> np.ndarray:
        out = np.full(len(lm.vocab.pieces), -np.inf, dtype=np.float32)
        out[other] = np.log(1 - p_more)
        out[opening] = np.log(p_more) if p_more > 0 else -np.inf
        return out

    lm.logits = logits  # type: ignore[method-assign]
    guide = GuidedDecoder(lm, lm.vocab, lambda sub: int(np.argmax(sub)))
    return drive(guide.another_call(lm.vocab.eog))


def test_another_call_follows_only_when_the_model_opens_one():
    assert not _after_call(FakeLM(), 0.0)
    assert not _after_call(FakeLM(), ANOTHER_CALL_THRESHOLD / 2)
    lm = FakeLM()
    assert _after_call(lm, ANOTHER_CALL_THRESHOLD * 2)
    assert lm.detok().endswith("}\n</tool_call>\n")  # the closing is evaluated; the marker is pending


def test_a_call_is_grounded_when_a_value_comes_from_the_conversation():
    said = ["You are a helpful voice assistant.", "Is it raining in Tokyo right now?"]
    assert grounded('{"city": "Tokyo", "unit": "celsius"}', said)
    assert not grounded('{"city": "Rome", "unit": "celsius"}', said)  # the enum alone grounds nothing
    assert grounded('{"value": 150.0, "from_unit": "lb"}', ["How many kilograms is 150 pounds?"])
    assert grounded('{"title": "Gym sessions"}', ["my gym session next Monday"])  # crude stems
    assert not grounded('{"order_id": "12345"}', ["What does the word 'ephemeral' mean?"])
    # Speech to text writes a spoken order number with a thousands separator; the call without.
    assert grounded('{"order_id": "48230"}', ["Where's my order? 48,230."])
    assert grounded('{"order_id": "48,230"}', ["order 48230"])
    assert not grounded('{"order_id": "48230"}', ["I have 48 apples and 230 pears"])
    assert grounded('{"order_id": "48213"}', ["Where is my order?", '{"last_order": "48213"}'])  # a tool result
    # Nothing to check: no values, only booleans, or not JSON.
    assert grounded("{}", said) and grounded('{"precise": true}', said) and grounded("{oops", said)
    assert not grounded('{"query": "the weather"}', ["what is the time and the date"])  # common words do not count


def test_name_stem_is_the_part_prose_never_writes():
    assert name_stem("get_weather") == "get_"
    assert name_stem("lookupOrder") == "lookupO"
    assert name_stem("web-search") == "web-"
    assert name_stem("search") is None  # a plain word: left alone
    assert name_stem("URLFetch") is None  # no lower-to-upper step, no separator


def test_name_guard_rules_out_the_tokens_that_complete_a_name():
    pieces = [b"get", b"_weather", b" get", b"_", b"get_", b" the", b" weather", b"et_w", b"lookup", b"_order"]
    vocab = TokenVocab(pieces)
    guard = NameGuard(vocab, ["get_weather", "lookup_order", "search"])
    ids = {p: i for i, p in enumerate(pieces)}

    def banned(text: str) -> set[bytes]:
        return {pieces[t] for t in guard.banned(text)}

    assert banned("Let me") == {b"get_"}  # a token holding a whole stem, anywhere
    assert banned("I will get") >= {b"_weather", b"_", b"get_"}  # after "get", no "_"
    assert b" the" not in banned("I will get") and b" weather" not in banned("I will get")
    assert b"et_w" in banned("I will g")
    assert b"_order" in banned("use lookup")
    assert ids[b"get"] not in guard.banned("")  # the word itself stays sayable
    assert len(NameGuard(vocab, ["search"]).banned("search")) == 0


def test_name_confidence_is_the_likeliest_first_token_of_a_name():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))

    def confidence(first_tokens: dict[str, int]) -> float:  # how GuidedDecoder.tool_call derives it
        return max(name_probabilities(logits, first_tokens).values(), default=0.0)

    assert confidence({"a": 1, "b": 2}) == pytest.approx(0.3)
    # names sharing a first token count once
    assert confidence({"a": 2, "b": 2, "c": 3}) == pytest.approx(0.15)
    assert name_probabilities(logits, {"a": 2, "b": 2})["b"] == pytest.approx(0.15)
    assert confidence({}) == 0.0


def test_a_call_the_model_is_unsure_of_is_declined_before_a_name_is_chosen():
    tools = [ToolSpec("get_weather", "w", {"type": "object", "properties": {"city": {"type": "string"}}}),
             ToolSpec("get_time", "t", None)]
    for sure in (False, True):
        lm = FakeLM(3)
        first = lm.tokenize('get_weather",')[0]  # both names open with "get"
        lm.bias[first] = 40.0 if sure else -40.0
        guide = GuidedDecoder(lm, lm.vocab, softmax_sampler(3))
        names: list[str] = []
        drive(guide.tool_call(tools, None, lambda n, names=names: (names.append(n), lambda _t: None)[1],
                              min_confidence=0.7))
        assert guide.name_confidence is not None
        assert guide.declined is not sure
        assert bool(names) is sure  # declined: no name chosen, nothing emitted
        assert lm.detok().startswith(TOOL_CALL_OPEN)  # the opening was evaluated to read the confidence


def test_name_guard_ignores_case_and_syntax_any_covers_wrapped_json():
    pieces = [b"Get", b"_weather", b'({"', b" hello", b"`", b"<tool", b"x}"]
    vocab = TokenVocab(pieces)
    guard = NameGuard(vocab, ["get_weather"])
    assert 1 in guard.banned("Call Get")  # "Get_weather(...)" is a name too
    assert {pieces[t] for t in vocab.syntax_any} == {b'({"', b"`", b"<tool", b"x}"}
