"""McpClient over the `mcp` SDK's streamable HTTP transport (HTTP+SSE for URLs ending in /sse).

One connection per operation (initialize, then list or call): nothing stays open between a
session's calls, so a session that ends leaves no connection or task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from .mcp import McpCallError, McpToolInfo

# The SDK's HTTP client logs every request at INFO: one line per MCP message is noise in a server log.
logging.getLogger("httpx2").setLevel(logging.WARNING)

# HTTP-ish codes for failures that have no HTTP status of their own.
UNREACHABLE = 502
TIMED_OUT = 504


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real causes inside the SDK's task-group ExceptionGroups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _as_mcp_error(exc: BaseException, url: str) -> McpCallError:
    for leaf in _leaves(exc):
        if isinstance(leaf, McpCallError):
            return leaf
        error = getattr(leaf, "error", None)  # the SDK's McpError carries the JSON-RPC ErrorData
        if error is not None and hasattr(error, "code"):
            return McpCallError("protocol_error", str(getattr(error, "message", leaf)), int(error.code))
        response = getattr(leaf, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return McpCallError("http_error", f"The MCP server at {url} answered HTTP {status}.", status)
        name = type(leaf).__name__
        if "Connect" in name or isinstance(leaf, OSError):
            return McpCallError("http_error", f"Could not connect to the MCP server at {url}: {leaf}", UNREACHABLE)
    leaf = _leaves(exc)[0]
    return McpCallError("http_error", f"The MCP server at {url} failed: {type(leaf).__name__}: {leaf}",
                        UNREACHABLE)


class StreamableHttpMcp:
    """The McpClient the server uses (see backends/mcp.py)."""

    @asynccontextmanager
    async def _session(self, url: str, headers: dict[str, str], timeout_s: float) -> AsyncIterator[Any]:
        from mcp.client.session import ClientSession
        from mcp.client.sse import sse_client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with contextlib.AsyncExitStack() as stack:
            if urlsplit(url).path.rstrip("/").endswith("/sse"):  # the older HTTP+SSE transport
                read, write = await stack.enter_async_context(
                    sse_client(url, headers=headers, timeout=timeout_s, sse_read_timeout=timeout_s))
            else:
                http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
                read, write = await stack.enter_async_context(streamable_http_client(url, http_client=http))
            session = await stack.enter_async_context(ClientSession(read, write, read_timeout_seconds=timeout_s))
            await session.initialize()
            yield session

    async def _run(self, url: str, headers: dict[str, str], timeout_s: float, op: Any) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session(url, headers, timeout_s) as session:
                    return await op(session)
        except TimeoutError:
            raise McpCallError("http_error", f"The MCP server at {url} did not answer within {timeout_s:g} s.",
                               TIMED_OUT) from None
        except McpCallError:
            raise
        except Exception as exc:
            raise _as_mcp_error(exc, url) from None

    async def list_tools(self, url: str, headers: dict[str, str], timeout_s: float) -> list[McpToolInfo]:
        async def op(session: Any) -> list[McpToolInfo]:
            tools: list[McpToolInfo] = []
            cursor = None
            while True:
                if cursor is None:
                    page = await session.list_tools()
                else:
                    from mcp_types import PaginatedRequestParams
                    page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
                for tool in page.tools:
                    annotations = tool.annotations.model_dump(mode="json", exclude_none=True, by_alias=True) \
                        if tool.annotations is not None else None
                    tools.append(McpToolInfo(name=tool.name, input_schema=dict(tool.input_schema),
                                             description=tool.description, annotations=annotations or None))
                cursor = getattr(page, "next_cursor", None)
                if not cursor or len(tools) > 1000:
                    return tools

        return await self._run(url, headers, timeout_s, op)

    async def call_tool(self, url: str, headers: dict[str, str], name: str, arguments: dict[str, Any],
                        timeout_s: float) -> str:
        async def op(session: Any) -> str:
            result = await session.call_tool(name, arguments)
            texts = [getattr(part, "text", None) for part in getattr(result, "content", None) or []]
            text = "\n".join(t for t in texts if t)
            if not text and getattr(result, "structured_content", None) is not None:
                text = json.dumps(result.structured_content)
            if getattr(result, "is_error", False):
                raise McpCallError("tool_execution_error", text or f"The tool '{name}' failed.")
            return text

        return await self._run(url, headers, timeout_s, op)
