"""Remote MCP servers as tools, against the real server (SmolLM2-135M; qwen2.5-1.5b for the answer
that must use a result) and a real MCP server.

The MCP server is the `mcp` SDK's own MCPServer over streamable HTTP on loopback (mcp_server.py):
`add`, `fail` (always errors) and `shout`. SmolLM2 never calls a tool on its own, so the calls
are forced with `tool_choice: {"type": "mcp", ...}`; schema-guided decoding makes the arguments valid.
Every event is validated against the SDKs' types (collect: openai-python strict, and the JS SDK's zod).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, client, collect, free_port
from .tool_auto import default_model_server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SLOW = 240  # a forced first call on a busy 2-core machine can take a minute before its first token


def run_mcp_server(*args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.mcp_server", str(port), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("the MCP test server did not start")
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    """The test MCP server over streamable HTTP."""
    proc, port = run_mcp_server()
    yield f"http://127.0.0.1:{port}/mcp"
    stop(proc)


@pytest.fixture(scope="module")
def mcp_sse_url() -> Iterator[str]:
    """The same server over the older HTTP+SSE transport (a URL ending in /sse)."""
    proc, port = run_mcp_server("sse")
    yield f"http://127.0.0.1:{port}/sse"
    stop(proc)


@pytest.fixture(scope="module")
def qwen() -> Iterator[Server]:
    """A server on qwen2.5-1.5b, for the one test that reads what the model says with a result in
    its prompt: SmolLM2-135M, even greedy, sometimes restates the question instead."""
    yield from default_model_server("mcp-qwen")


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def calc(url: str, **kw: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "calc", "server_url": url, **kw}


async def setup(conn: Any, tools: list[dict], **session: Any) -> list[dict]:
    """session.update with the tools; the events until the MCP listing ends."""
    await collect(conn, "session.created")
    await conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": tools,
                                       **session})
    return await collect(conn, "mcp_list_tools.completed")


def mcp_events(events: list[dict], item_id: str) -> list[str]:
    return [e["type"] for e in events if e.get("item_id") == item_id]


async def test_list_tools(server: Server, mcp_url: str):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        events = await setup(conn, [calc(mcp_url)])
        types = [e["type"] for e in events]
        assert types[-5:] == ["session.updated", "conversation.item.added", "mcp_list_tools.in_progress",
                              "conversation.item.done", "mcp_list_tools.completed"]
        item = events[-2]["item"]
        assert item["type"] == "mcp_list_tools" and item["server_label"] == "calc"
        tools = {t["name"]: t for t in item["tools"]}
        assert set(tools) == {"add", "fail", "shout"}
        assert tools["add"]["input_schema"]["required"] == ["a", "b"]
        assert tools["shout"]["annotations"] == {"readOnlyHint": True}
        await conn.conversation.item.retrieve(item_id=item["id"])
        retrieved = (await collect(conn, "conversation.item.retrieved"))[-1]
        assert retrieved["item"]["tools"] == item["tools"]


async def test_call_result_reaches_the_answer(qwen: Server, mcp_url: str):
    async with client(qwen).realtime.connect(model="gpt-realtime") as conn:
        await setup(conn, [calc(mcp_url, require_approval="never")], temperature=0.0,
                    instructions="Answer with the tool result.")
        await conn.conversation.item.create(item=user("What is 2 plus 3? Use the add tool."))
        await conn.response.create(response={
            "tool_choice": {"type": "mcp", "server_label": "calc", "name": "add"}, "max_output_tokens": 40})
        events = await collect(conn, "response.done", SLOW)
        response = events[-1]["response"]
        assert response["status"] in ("completed", "incomplete"), response
        call, message = response["output"]
        assert call["type"] == "mcp_call" and call["name"] == "add" and call["error"] is None
        args = json.loads(call["arguments"])
        assert call["output"] == f"The sum is {args['a'] + args['b']}."
        kinds = mcp_events(events, call["id"])
        deltas = [e for e in events if e["type"] == "response.mcp_call_arguments.delta"]
        assert "".join(e["delta"] for e in deltas) == call["arguments"]
        assert [k for k in kinds if k != "response.mcp_call_arguments.delta"] == [
            "response.mcp_call_arguments.done", "response.mcp_call.in_progress", "response.mcp_call.completed"]
        # The same response goes on: the model's answer, written with the result in its prompt.
        assert message["type"] == "message" and str(args["a"] + args["b"]) in message["content"][0]["text"]
        assert response["usage"]["input_tokens"] > 0
        # The call stays in the conversation for later turns.
        await conn.conversation.item.retrieve(item_id=call["id"])
        retrieved = (await collect(conn, "conversation.item.retrieved"))[-1]["item"]
        assert retrieved["output"] == call["output"]


async def test_erroring_tool_and_the_session_goes_on(server: Server, mcp_url: str):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await setup(conn, [calc(mcp_url, require_approval="never")])
        await conn.conversation.item.create(item=user("Try the fail tool."))
        await conn.response.create(response={
            "tool_choice": {"type": "mcp", "server_label": "calc", "name": "fail"}, "max_output_tokens": 20})
        events = await collect(conn, "response.done", SLOW)
        response = events[-1]["response"]
        assert response["status"] in ("completed", "incomplete")
        call = response["output"][0]
        assert call["type"] == "mcp_call" and call["output"] is None
        assert call["error"]["type"] == "tool_execution_error" and "fail" in call["error"]["message"]
        assert "response.mcp_call.failed" in mcp_events(events, call["id"])
        assert [o["type"] for o in response["output"]][1:] == ["message"]
        await conn.response.create(response={"tool_choice": "none", "max_output_tokens": 5})
        assert (await collect(conn, "response.done", SLOW))[-1]["response"]["status"] in ("completed", "incomplete")


@pytest.mark.parametrize("approve", [True, False])
async def test_approval_flow(server: Server, mcp_url: str, approve: bool):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await setup(conn, [calc(mcp_url, require_approval="always")],
                    tool_choice={"type": "mcp", "server_label": "calc", "name": "add"})
        await conn.conversation.item.create(item=user("Add 4 and 5."))
        await conn.response.create(response={"max_output_tokens": 30})
        events = await collect(conn, "response.done", SLOW)
        [request] = events[-1]["response"]["output"]
        assert request["type"] == "mcp_approval_request" and request["name"] == "add"
        assert not any(e["type"].startswith("response.mcp_call") for e in events)
        await conn.conversation.item.create(item={"type": "mcp_approval_response",
                                                  "approval_request_id": request["id"], "approve": approve})
        done = (await collect(conn, "conversation.item.done"))[-1]["item"]
        assert done["type"] == "mcp_approval_response" and done["approve"] is approve
        await conn.response.create(response={"max_output_tokens": 30})
        events = await collect(conn, "response.done", SLOW)
        response = events[-1]["response"]
        assert response["status"] in ("completed", "incomplete")
        if approve:
            call, message = response["output"]
            args = json.loads(request["arguments"])
            assert call["type"] == "mcp_call" and call["approval_request_id"] == request["id"]
            assert call["arguments"] == request["arguments"]
            assert call["output"] == f"The sum is {args['a'] + args['b']}."
        else:
            [message] = response["output"]
        assert message["type"] == "message"


async def test_unreachable_server_fails_the_listing(server: Server):
    url = f"http://127.0.0.1:{free_port()}/mcp"
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "tools": [calc(url)]})
        events = await collect(conn, "mcp_list_tools.failed")
        item = next(e["item"] for e in events if e["type"] == "conversation.item.done")
        assert item["type"] == "mcp_list_tools" and item["tools"] == []
        err = (await collect(conn, "error"))[-1]["error"]
        assert err["code"] == "mcp_list_tools_failed" and "connect" in err["message"].lower()
        # A forced choice of its tools fails the response with the reason; nothing hangs.
        await conn.conversation.item.create(item=user("hi"))
        await conn.response.create(response={"tool_choice": {"type": "mcp", "server_label": "calc"}})
        response = (await collect(conn, "response.done", SLOW))[-1]["response"]
        assert response["status"] == "failed"
        assert "not available" in response["status_details"]["error"]["message"]


async def test_disallowed_host_is_refused(server: Server):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "tools": [calc("http://example.com/mcp")]})
        err = (await collect(conn, "error"))[-1]["error"]
        assert err["param"] == "session.tools[0].server_url" and "not allowed" in err["message"]
        await conn.response.create(response={"tools": [calc("http://169.254.169.254/mcp")]})
        err = (await collect(conn, "error"))[-1]["error"]
        assert err["param"] == "response.tools[0].server_url"


async def test_voice_answer_after_the_call(server: Server, mcp_url: str):
    """In voice mode the call makes no audio; the answer written with its result is spoken."""
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "tools": [calc(mcp_url, require_approval="never")],
                                           "audio": {"input": {"turn_detection": None}}})
        events = await collect(conn, "mcp_list_tools.completed")
        updated = next(e for e in events if e["type"] == "session.updated")["session"]
        if "audio" not in updated["output_modalities"]:
            pytest.skip("the server has no speech synthesis")
        await conn.conversation.item.create(item=user("What is 2 plus 3?"))
        await conn.response.create(response={
            "tool_choice": {"type": "mcp", "server_label": "calc", "name": "add"}, "max_output_tokens": 30})
        events = await collect(conn, "response.done", SLOW)
        response = events[-1]["response"]
        call, message = response["output"]
        assert call["type"] == "mcp_call" and call["output"].startswith("The sum is")
        part = message["content"][0]
        assert part["type"] == "output_audio" and part["transcript"].strip()
        completed = next(i for i, e in enumerate(events) if e["type"] == "response.mcp_call.completed")
        audio = [i for i, e in enumerate(events) if e["type"] == "response.output_audio.delta"]
        assert audio and min(audio) > completed


async def test_sse_transport(server: Server, mcp_sse_url: str):
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        events = await setup(conn, [calc(mcp_sse_url, require_approval="never")])
        item = next(e["item"] for e in events if e["type"] == "conversation.item.done")
        assert {t["name"] for t in item["tools"]} == {"add", "fail", "shout"}
        await conn.conversation.item.create(item=user("Shout hello."))
        await conn.response.create(response={
            "tool_choice": {"type": "mcp", "server_label": "calc", "name": "shout"}, "max_output_tokens": 40})
        call = (await collect(conn, "response.done", SLOW))[-1]["response"]["output"][0]
        word = json.loads(call["arguments"])["word"]
        assert call["type"] == "mcp_call" and call["error"] is None
        assert call["output"] == word.upper() or not word
