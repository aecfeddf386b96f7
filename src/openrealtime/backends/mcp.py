"""What the engine needs of a remote MCP server (list its tools, call one), without network code.

The engine talks to `McpClient`; backends/mcp_client.py implements it with the `mcp` SDK, and tests
may pass any object with the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

McpErrorKind = Literal["http_error", "protocol_error", "tool_execution_error"]


@dataclass(slots=True)
class McpToolInfo:
    """One tool an MCP server lists (the fields of an `mcp_list_tools` item's `tools`)."""

    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    annotations: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "input_schema": self.input_schema}
        if self.description is not None:
            data["description"] = self.description
        if self.annotations is not None:
            data["annotations"] = self.annotations
        return data


class McpCallError(Exception):
    """A failed MCP operation, in the shape of an `mcp_call` item's `error` (HTTP, protocol or tool)."""

    def __init__(self, kind: McpErrorKind, message: str, code: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code

    def wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.kind != "tool_execution_error":
            data["code"] = self.code if self.code is not None else 0
        return data


class McpClient(Protocol):
    """Talks to remote MCP servers; every failure (timeouts included) is an McpCallError."""

    async def list_tools(self, url: str, headers: dict[str, str], timeout_s: float) -> list[McpToolInfo]:
        """The tools the server at `url` lists."""
        ...

    async def call_tool(self, url: str, headers: dict[str, str], name: str, arguments: dict[str, Any],
                        timeout_s: float) -> str:
        """Run one tool; its result as text (a tool that reports an error raises McpCallError)."""
        ...
