"""A tiny real MCP server for the e2e tests (the `mcp` SDK's MCPServer, streamable HTTP on loopback).

Run as ``python -m tests.e2e.mcp_server PORT [sse]`` (served at /mcp, or /sse with "sse");
tools: `add`, `shout` (read-only) and `fail` (errors).
"""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("openrealtime-test")


@server.tool(description="Add two integers and return their sum.")
def add(a: int, b: int) -> str:
    return f"The sum is {a + b}."


@server.tool(description="Always fails: used to test tool errors.")
def fail(reason: str) -> str:
    raise RuntimeError(f"the tool broke on purpose: {reason}")


@server.tool(description="Repeat a word in capitals.", annotations={"readOnlyHint": True})
def shout(word: str) -> str:
    return word.upper()


if __name__ == "__main__":
    if sys.argv[2:] == ["sse"]:
        server.run("sse", host="127.0.0.1", port=int(sys.argv[1]))
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]), stateless_http=True)
