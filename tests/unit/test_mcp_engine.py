"""Remote MCP servers as tools in the engine: validation, listing, calls, approvals (fake MCP client)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from openrealtime.backends.llm import Finished, TextDelta, Usage
from openrealtime.backends.mcp import McpCallError, McpToolInfo
from openrealtime.engine import EngineContext, RealtimeSession

from .test_engine import drain, send, user_text
from .test_tools_engine import WEATHER, ToolLLM, call

URL = "http://127.0.0.1:9/mcp"
ADD = McpToolInfo(name="add", input_schema={"type": "object", "properties": {"a": {"type": "integer"},
                                                                              "b": {"type": "integer"}}},
                  description="Add two integers.")
SHOUT = McpToolInfo(name="shout", input_schema={"type": "object", "properties": {"word": {"type": "string"}}},
                    annotations={"readOnlyHint": True})
FAIL = McpToolInfo(name="get_weather", input_schema={"type": "object", "properties": {}})


class FakeMcp:
    """Lists fixed tools; `add` adds, anything else fails; `down` makes every operation unreachable."""

    def __init__(self, tools: list[McpToolInfo] | None = None, down: bool = False):
        self.tools = tools if tools is not None else [ADD, SHOUT]
        self.down = down
        self.calls: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    async def list_tools(self, url: str, headers: dict[str, str], timeout_s: float) -> list[McpToolInfo]:
        await asyncio.sleep(0)
        if self.down:
            raise McpCallError("http_error", f"Could not connect to the MCP server at {url}", 502)
        return self.tools

    async def call_tool(self, url: str, headers: dict[str, str], name: str, arguments: dict[str, Any],
                        timeout_s: float) -> str:
        self.calls.append((name, arguments, headers))
        if name == "add":
            return f"The sum is {arguments['a'] + arguments['b']}."
        raise McpCallError("tool_execution_error", f"the tool {name} broke")


def make(llm: ToolLLM, mcp: FakeMcp | None = None, hosts: tuple[str, ...] = ("127.0.0.1",)) -> RealtimeSession:
    async def resolve(model: str | None):
        return llm

    ctx = EngineContext(resolve_llm=resolve, default_model="m", default_instructions="Be brief.",
                        mcp=mcp if mcp is not None else FakeMcp(), mcp_allowed_hosts=hosts)
    return RealtimeSession(ctx, transport="websocket")


def server(**kw: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "calc", "server_url": URL, **kw}


async def listed(s: RealtimeSession, tools: list[dict], **session: Any) -> list[dict]:
    """session.update with MCP tools; the events up to the listing's end."""
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {"output_modalities": ["text"], "tools": tools,
                                                         **session}})
    events = await drain(s, "session.updated")
    events += await drain(s)
    return events


@pytest.mark.parametrize(("tool", "param", "needle"), [
    (server(server_url="http://10.0.0.1/mcp"), "session.tools[0].server_url", "not allowed"),
    (server(server_url=None, connector_id="connector_gmail"), "session.tools[0].connector_id", "connectors"),
    ({"type": "mcp", "server_label": "calc"}, "session.tools[0]", "server_url"),
    (server(server_url="file:///etc/passwd"), "session.tools[0].server_url", "http"),
    (server(require_approval="sometimes"), "session.tools[0].require_approval", "Invalid value"),
])
async def test_bad_mcp_tools_are_refused_with_their_param(tool: dict, param: str, needle: str):
    s = make(ToolLLM([[TextDelta("x")]]))
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {"tools": [tool]}})
    [err] = await drain(s)
    assert err["type"] == "error" and err["error"]["param"] == param, err
    assert needle in err["error"]["message"]
    await send(s, {"type": "session.update", "session": {"tools": [server(), server()]}})
    [err] = await drain(s)
    assert err["error"]["param"] == "session.tools[1].server_label"
    await send(s, {"type": "response.create", "response": {"tools": [server(server_url="https://example.com/x")]}})
    [err] = await drain(s)
    assert err["error"]["param"] == "response.tools[0].server_url"
    await send(s, {"type": "response.create", "response": {"tool_choice": {"type": "mcp", "server_label": "x"}}})
    [err] = await drain(s)
    assert err["error"]["param"] == "response.tool_choice"
    await s.close()


async def test_allow_list_star_and_no_client():
    s = make(ToolLLM([[TextDelta("x")]]), hosts=("*",))
    events = await listed(s, [server(server_url="https://mcp.example.com/mcp")])
    assert "mcp_list_tools.completed" in [e["type"] for e in events]
    await s.close()
    s = make(ToolLLM([[TextDelta("x")]]))
    s.ctx.mcp = None
    await s.start()
    await drain(s)
    await send(s, {"type": "session.update", "session": {"tools": [server()]}})
    [err] = await drain(s)
    assert err["error"]["param"] == "session.tools[0].type"
    await s.close()


async def test_listing_events_and_item():
    s = make(ToolLLM([[TextDelta("x")]]))
    events = await listed(s, [server(require_approval="never"), WEATHER])
    types = [e["type"] for e in events]
    assert types == ["session.updated", "conversation.item.added", "mcp_list_tools.in_progress",
                     "conversation.item.done", "mcp_list_tools.completed"]
    item = events[3]["item"]
    assert item["type"] == "mcp_list_tools" and item["server_label"] == "calc"
    assert [t["name"] for t in item["tools"]] == ["add", "shout"]
    assert events[2]["item_id"] == events[4]["item_id"] == item["id"] == events[1]["item"]["id"]
    # The same server again: no second listing; a changed header lists again.
    await send(s, {"type": "session.update", "session": {"instructions": "Hi."}})
    assert [e["type"] for e in await drain(s)] == ["session.updated"]
    await send(s, {"type": "session.update", "session": {"tools": [server(headers={"X-Key": "k"})]}})
    assert "mcp_list_tools.completed" in [e["type"] for e in await drain(s)]
    await s.close()


async def test_unreachable_server_fails_the_listing_and_a_forced_choice():
    llm = ToolLLM([[TextDelta("x")]])
    s = make(llm, FakeMcp(down=True))
    events = await listed(s, [server()])
    types = [e["type"] for e in events]
    assert types[-3:] == ["conversation.item.done", "mcp_list_tools.failed", "error"]
    assert events[-3]["item"]["tools"] == []
    assert events[-1]["error"]["code"] == "mcp_list_tools_failed" and "Could not connect" in \
        events[-1]["error"]["message"]
    await send(s, user_text("1+2?"))
    await drain(s)
    await send(s, {"type": "response.create",
                   "response": {"tool_choice": {"type": "mcp", "server_label": "calc", "name": "add"}}})
    done = (await drain(s, "response.done"))[-1]["response"]
    assert done["status"] == "failed" and "not available" in done["status_details"]["error"]["message"]
    # Without a forced choice the response just has no MCP tools to offer.
    await send(s, {"type": "response.create"})
    done = (await drain(s, "response.done"))[-1]["response"]
    assert done["status"] == "completed" and llm.params[-1].tools == []
    await s.close()


async def test_call_runs_and_the_response_continues_with_the_result():
    llm = ToolLLM([call(0, "add", '{"a": 2, "b": 3}'), [TextDelta("Two plus three is five.")]])
    mcp = FakeMcp()
    s = make(llm, mcp)
    listing = await listed(s, [server(require_approval="never", authorization="tok", headers={"X-Key": "k"})],
                           tool_choice={"type": "mcp", "server_label": "calc", "name": "add"})
    [echo] = [e["session"]["tools"][0] for e in listing if e["type"] == "session.updated"]
    assert "authorization" not in echo and "headers" not in echo  # credentials are write-only
    await send(s, user_text("What is 2 + 3?"))
    await drain(s)
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    first_delta = types.index("response.mcp_call_arguments.delta")
    assert types[:first_delta] == ["response.created", "response.output_item.added", "conversation.item.added"]
    rest = [t for t in types[first_delta:] if t != "response.mcp_call_arguments.delta"]
    assert rest[:6] == ["response.mcp_call_arguments.done", "response.mcp_call.in_progress",
                        "response.mcp_call.completed", "response.output_item.done", "conversation.item.done",
                        "response.output_item.added"]
    response = events[-1]["response"]
    assert response["status"] == "completed"
    mcp_item, message = response["output"]
    assert mcp_item["type"] == "mcp_call" and mcp_item["name"] == "add" and mcp_item["server_label"] == "calc"
    assert mcp_item["output"] == "The sum is 5." and mcp_item["error"] is None
    assert json.loads(mcp_item["arguments"]) == {"a": 2, "b": 3}
    assert message["content"][0]["text"] == "Two plus three is five."
    assert mcp.calls == [("add", {"a": 2, "b": 3}, {"X-Key": "k", "Authorization": "Bearer tok"})]
    # First generation forced to the tool, the second answers (auto) with the result in its prompt.
    assert llm.params[0].tool_choice == "add" and llm.params[1].tool_choice == "auto"
    assert [t.name for t in llm.params[0].tools] == ["add", "shout"]
    assert llm.prompts[1][-1].role == "tool" and llm.prompts[1][-1].content == "The sum is 5."
    # The call stays in the conversation: the next prompt shows it too.
    await send(s, {"type": "response.create", "response": {"tool_choice": "none"}})
    await drain(s, "response.done")
    assert any(m.role == "tool" and m.content == "The sum is 5." for m in llm.prompts[-1])
    await s.close()


async def test_tool_error_fails_the_call_and_the_response_goes_on():
    llm = ToolLLM([call(0, "get_weather", "{}"), [TextDelta("Sorry, that failed.")]])
    s = make(llm, FakeMcp(tools=[FAIL]))
    # The MCP tool's name clashes with a function tool: it is offered under its server's prefix.
    await listed(s, [WEATHER, server(require_approval="never")])
    assert [t.name for t in s.mcp.offer(s.config.tools).specs] == ["calc__get_weather"]
    llm.scripts[0] = call(0, "calc__get_weather", "{}")
    await send(s, user_text("Weather?"))
    await drain(s)
    await send(s, {"type": "response.create",
                   "response": {"tool_choice": {"type": "mcp", "server_label": "calc"}}})
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert "response.mcp_call.failed" in types and "response.mcp_call.completed" not in types
    response = events[-1]["response"]
    assert response["status"] == "completed"
    item = response["output"][0]
    assert item["error"] == {"type": "tool_execution_error", "message": "the tool get_weather broke"}
    assert item["output"] is None and item["name"] == "get_weather"
    assert response["output"][1]["content"][0]["text"] == "Sorry, that failed."
    assert llm.params[0].tool_choice == "required" and [t.name for t in llm.params[0].tools] == ["calc__get_weather"]
    assert llm.prompts[1][-1].content == "Error: the tool get_weather broke"
    await s.close()


@pytest.mark.parametrize("approve", [True, False])
async def test_approval_request_then_response(approve: bool):
    llm = ToolLLM([call(0, "add", '{"a": 1, "b": 1}'), [TextDelta("Done.")]])
    mcp = FakeMcp()
    s = make(llm, mcp)
    # A filter: shout (read-only) never needs approval, the rest always.
    await listed(s, [server(require_approval={"never": {"read_only": True}})],
                 tool_choice={"type": "mcp", "server_label": "calc", "name": "add"})
    await send(s, user_text("1+1?"))
    await drain(s)
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    assert not any(e["type"].startswith("response.mcp_call") for e in events)
    response = events[-1]["response"]
    [request] = response["output"]
    assert request["type"] == "mcp_approval_request" and request["name"] == "add"
    assert json.loads(request["arguments"]) == {"a": 1, "b": 1} and mcp.calls == []
    assert len(llm.params) == 1  # the response ends, waiting for the client
    await send(s, {"type": "conversation.item.create", "item": {
        "type": "mcp_approval_response", "approval_request_id": request["id"], "approve": approve}})
    [_added, done] = await drain(s)
    assert done["item"]["type"] == "mcp_approval_response" and done["item"]["approve"] is approve
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    response = events[-1]["response"]
    assert response["status"] == "completed"
    if approve:
        call_item, message = response["output"]
        assert call_item["type"] == "mcp_call" and call_item["approval_request_id"] == request["id"]
        assert call_item["output"] == "The sum is 2." and mcp.calls[0][:2] == ("add", {"a": 1, "b": 1})
        assert "response.mcp_call.completed" in [e["type"] for e in events]
        assert llm.prompts[-1][-1].content == "The sum is 2."
    else:
        [message] = response["output"]
        assert mcp.calls == []
        assert llm.prompts[-1][-1].content == "The user declined to run this tool."
    assert message["type"] == "message" and llm.params[-1].tool_choice == "auto"
    # An answer is acted on once: the next response is an ordinary (forced) one.
    await send(s, {"type": "response.create"})
    events = await drain(s, "response.done")
    assert llm.params[-1].tool_choice == "add"
    # Answering a request that does not exist, or writing server items, is refused.
    await send(s, {"type": "conversation.item.create", "item": {
        "type": "mcp_approval_response", "approval_request_id": "nope", "approve": True}})
    [err] = await drain(s)
    assert err["error"]["param"] == "item.approval_request_id"
    await send(s, {"type": "conversation.item.create", "item": {
        "type": "mcp_call", "server_label": "calc", "name": "add", "arguments": "{}"}})
    [err] = await drain(s)
    assert err["error"]["param"] == "item.type"
    await s.close()


async def test_allowed_tools_and_per_response_servers():
    llm = ToolLLM([[TextDelta("ok")]])
    s = make(llm)
    await s.start()
    await drain(s)
    await send(s, user_text("hi"))
    await drain(s)
    # A server only this response names is listed first (its events inside the response's).
    await send(s, {"type": "response.create", "response": {"tools": [server(allowed_tools=["shout"])]}})
    events = await drain(s, "response.done")
    types = [e["type"] for e in events]
    assert "mcp_list_tools.completed" in types
    assert [t.name for t in llm.params[-1].tools] == ["shout"]
    await send(s, {"type": "response.create", "response": {
        "tools": [server(allowed_tools={"read_only": False})]}})
    await drain(s, "response.done")
    assert [t.name for t in llm.params[-1].tools] == ["add"]
    await s.close()


class CutLLM(ToolLLM):
    """Stops at the output cap in the middle of a call's arguments."""

    async def stream(self, messages, params):  # type: ignore[override]
        self.params.append(params)
        for event in call(0, "add", '{"a": 2, "b"'):
            yield event
        yield Finished("length", Usage(1, 5, 0))  # type: ignore[arg-type]


async def test_a_call_cut_by_the_output_cap_is_not_run():
    mcp = FakeMcp()
    s = make(CutLLM([]), mcp)
    await listed(s, [server(require_approval="never")],
                 tool_choice={"type": "mcp", "server_label": "calc", "name": "add"})
    await send(s, user_text("2+3?"))
    await drain(s)
    await send(s, {"type": "response.create", "response": {"max_output_tokens": 5}})
    events = await drain(s, "response.done")
    response = events[-1]["response"]
    assert response["status"] == "incomplete" and mcp.calls == []
    [item] = response["output"]
    assert item["arguments"] == '{"a": 2, "b"' and "max_output_tokens" in item["error"]["message"]
    assert [e["type"] for e in events if e["type"].startswith("response.mcp_call")][-2:] == [
        "response.mcp_call_arguments.done", "response.mcp_call.failed"]
    await s.close()
