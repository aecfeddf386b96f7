"""Remote MCP servers as tools: the session's listings, what a response offers, approvals.

The Realtime flow of `tools` entries of type "mcp": when a session names a server, the server lists
its tools (an `mcp_list_tools` item with `mcp_list_tools.in_progress` / `.completed` / `.failed`);
responses offer the listed tools to the model next to the function tools, and run the calls the
model makes themselves (engine/response.py). Network code stays behind `backends.mcp.McpClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..backends.llm import ToolSpec
from ..backends.mcp import McpCallError, McpToolInfo
from ..protocol import events as ev
from ..protocol.errors import ProtocolError
from ..protocol.events import new_id
from ..protocol.items import Item
from ..protocol.session import FunctionTool, McpTool

if TYPE_CHECKING:
    from .session import RealtimeSession

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def mcp_tools(tools: list[Any]) -> list[McpTool]:
    return [t for t in tools if isinstance(t, McpTool)]


def check_mcp_tools(tools: list[Any], allowed_hosts: tuple[str, ...] | list[str], available: bool,
                    param: str) -> None:
    """Refuse what this server will not connect to: unique labels, allowed hosts only (operator setting)."""
    seen: set[str] = set()
    allowed = {h.lower().strip("[]") for h in allowed_hosts}
    for i, tool in enumerate(tools):
        if not isinstance(tool, McpTool):
            continue
        where = f"{param}[{i}]"
        if not available:
            raise ProtocolError("MCP tools are not available on this server.", code="unsupported_value",
                                param=f"{where}.type")
        if tool.server_label in seen:
            raise ProtocolError(f"Duplicate MCP server_label '{tool.server_label}': labels must be unique.",
                                param=f"{where}.server_label")
        seen.add(tool.server_label)
        host = (urlsplit(tool.server_url or "").hostname or "").lower()
        if "*" not in allowed and host not in allowed:
            raise ProtocolError(
                f"The MCP server_url host '{host}' is not allowed on this server (allowed: "
                f"{', '.join(sorted(allowed)) or 'none'}; the operator sets OPENREALTIME_MCP_ALLOWED_HOSTS).",
                code="invalid_value", param=f"{where}.server_url")


def request_headers(tool: McpTool) -> dict[str, str]:
    headers = dict(tool.headers or {})
    if tool.authorization:
        headers["Authorization"] = f"Bearer {tool.authorization}"
    return headers


def _listing_key(tool: McpTool) -> str:
    return json.dumps([tool.server_url, tool.headers, tool.authorization], sort_keys=True)


@dataclass(slots=True)
class Listing:
    """One server's `mcp_list_tools` item and its outcome (`tools` None while listing or after a failure)."""

    key: str
    item: Item
    task: asyncio.Task[None] | None = None
    tools: list[McpToolInfo] | None = None
    error: str | None = None


@dataclass(slots=True)
class McpOffer:
    """The MCP tools one response offers: their specs and, by offered name, the server and the tool."""

    specs: list[ToolSpec] = field(default_factory=list)
    names: dict[str, tuple[McpTool, McpToolInfo]] = field(default_factory=dict)


class McpSessionTools:
    """A session's MCP servers: listed once per (url, headers), reused by every response."""

    def __init__(self, session: RealtimeSession):
        self.session = session
        self.listings: dict[str, Listing] = {}
        # Approval requests a response has already acted on (run or declined): never twice.
        self.answered: set[str] = set()

    @property
    def timeout_s(self) -> float:
        return self.session.ctx.mcp_timeout_s

    def sync(self, tools: list[Any]) -> None:
        """List every server that is new or changed (session.update, or a response's own tools)."""
        for tool in mcp_tools(tools):
            current = self.listings.get(tool.server_label)
            key = _listing_key(tool)
            if current is not None and current.key == key:
                continue
            if current is not None and current.task is not None:
                current.task.cancel()
            self._start(tool, key)

    def _start(self, tool: McpTool, key: str) -> None:
        item = Item(id=new_id("mcpl"), type="mcp_list_tools", server_label=tool.server_label, tools=[])
        listing = Listing(key=key, item=item)
        self.listings[tool.server_label] = listing
        previous = self.session.conversation.insert(item)
        self.session.emit(ev.ConversationItemAdded(previous_item_id=previous, item=item.wire()))
        self.session.emit(ev.McpListToolsInProgress(item_id=item.id or ""))
        listing.task = asyncio.create_task(self._list(tool, listing), name=f"mcp-list-{tool.server_label}")

    async def _list(self, tool: McpTool, listing: Listing) -> None:
        session = self.session
        client = session.ctx.mcp
        item = listing.item
        try:
            if client is None:
                raise McpCallError("protocol_error", "MCP tools are not available on this server.")
            listing.tools = await client.list_tools(tool.server_url or "", request_headers(tool), self.timeout_s)
        except McpCallError as exc:
            listing.error = exc.message
        except Exception as exc:  # an SDK bug must still end as `.failed`, never a stuck listing
            log.exception("session %s: listing MCP server '%s' failed", session.id, tool.server_label)
            listing.error = f"Listing the tools failed: {exc}"
        item.tools = [t.wire() for t in listing.tools or []]
        if session.conversation.get(item.id or "") is item:
            session.emit(ev.ConversationItemDone(previous_item_id=session.conversation.previous_id(item.id or ""),
                                                 item=item.wire()))
        if listing.error is None:
            session.emit(ev.McpListToolsCompleted(item_id=item.id or ""))
            return
        log.warning("session %s: MCP server '%s': %s", session.id, tool.server_label, listing.error)
        session.emit(ev.McpListToolsFailed(item_id=item.id or ""))
        # The failed event carries no reason: say it in an `error` too.
        session.emit(ev.ErrorEvent(error=ev.ErrorDetail(
            type="server_error", code="mcp_list_tools_failed",
            message=f"Listing the tools of MCP server '{tool.server_label}' failed: {listing.error}")))

    async def ready(self, tools: list[Any]) -> None:
        """Wait for the listings a response needs (starting those its own `tools` bring)."""
        self.sync(tools)
        tasks = [self.listings[t.server_label].task for t in mcp_tools(tools)]
        pending = [t for t in tasks if t is not None and not t.done()]
        if pending:
            await asyncio.wait(pending)

    def offer(self, tools: list[Any], only: str | None = None) -> McpOffer:
        """Listed tools (filtered by `allowed_tools`) under names that clash with no function tool.

        A tool keeps its own name when it is unique, else `<server_label>__<name>`; `only` keeps one
        server's tools (a `tool_choice` of type "mcp" without a name).
        """
        offer = McpOffer()
        taken = {t.name for t in tools if isinstance(t, FunctionTool)}
        for server in mcp_tools(tools):
            listing = self.listings.get(server.server_label)
            if listing is None or listing.tools is None or (only is not None and server.server_label != only):
                continue
            for tool in listing.tools:
                if not server.allows(tool.name, tool.annotations):
                    continue
                name = tool.name
                if name in taken or not _NAME.match(name):
                    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server.server_label}__{tool.name}")[:64]
                if name in taken:
                    continue
                taken.add(name)
                offer.names[name] = (server, tool)
                offer.specs.append(ToolSpec(name=name, description=tool.description,
                                            parameters=tool.input_schema or None))
        return offer

    def choose(self, tools: list[Any], label: str, name: str | None) -> tuple[McpOffer, str]:
        """What a `tool_choice` of type "mcp" means once the server is listed: (offer, tool_choice)."""
        listing = self.listings.get(label)
        if listing is None or listing.tools is None:
            reason = listing.error if listing is not None else "it is not among the tools"
            raise McpCallError("protocol_error", f"tool_choice names MCP server '{label}', whose tools are not "
                                                 f"available: {reason}")
        if name is None:
            return self.offer(tools, only=label), "required"
        offer = self.offer(tools)
        for offered, (server, tool) in offer.names.items():
            if server.server_label == label and tool.name == name:
                return offer, offered
        raise McpCallError("protocol_error", f"tool_choice names the tool '{name}' of MCP server '{label}', "
                                             "which that server does not list (or allowed_tools leaves out).")

    async def close(self) -> None:
        tasks = [listing.task for listing in self.listings.values() if listing.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def approval_outcomes(items: list[Item]) -> dict[str, bool]:
    """approval_request_id -> approve, for every mcp_approval_response among `items` (the last one wins)."""
    return {it.approval_request_id or "": bool(it.approve) for it in items if it.type == "mcp_approval_response"}
