"""This node among others: its registry entries, the calls it owns, and forwarding to their owners.

With shared state (`state_url`) every node announces itself (id, internal URL, ICE addresses, load,
draining) and the calls it owns, refreshed by a heartbeat and expiring three heartbeats after the
last one, so a dead node's entries disappear by themselves. Call ids carry the owner
(`rtc_<node_id>_<hex>`) so a balancer can route by them; behind a plain round-robin balancer a node
that receives a hangup or a `?call_id=` sideband for another node's call forwards it to the owner
with the caller's own credentials, and the owner does every check (key, ownership, limits) as if
the caller had reached it directly. Registry writes are best-effort: a call in progress never
depends on the store, and the next heartbeat writes everything again (after a store restart too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from typing import Any

import httpx
from fastapi import WebSocket
from starlette.responses import Response
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..config import Settings
from ..state import CallRecord, NodeInfo, StateBackend, StateUnavailable
from .admission import Admission
from .errors import APIError

log = logging.getLogger(__name__)

# Set on a request one node forwards to another: the receiver answers it itself (never forwards again).
FORWARDED_HEADER = "x-openrealtime-forwarded-by"
# Request headers a forwarded hangup or sideband carries (credentials and what SDKs add).
_FORWARD_HEADERS = ("authorization", "openai-beta", "user-agent")
_FORWARD_TIMEOUT_S = 10.0


def default_node_id(settings: Settings) -> str:
    """Host name and port, in the node-id alphabet (unique per host:port, stable across restarts)."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:24].strip("-") or "node"
    return f"{host}-{settings.port}"


def default_node_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: the address other hosts resolve us by
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


class Cluster:
    """This node's registry entries and the forwarding of other nodes' calls."""

    def __init__(self, settings: Settings, state: StateBackend, admission: Admission, calls: Any) -> None:
        self.state = state
        self.shared = state.shared
        self.node_id = settings.node_id or default_node_id(settings)
        self.url = (settings.node_url or default_node_url(settings)).rstrip("/")
        self.heartbeat_s = settings.node_heartbeat_s
        self.state_timeout_s = settings.state_timeout_s
        self.ttl_s = 3 * settings.node_heartbeat_s
        self.ice_addresses = list(settings.ice.addresses)
        self.admission = admission
        self.calls = calls  # transports.webrtc.CallManager
        self.records: dict[str, CallRecord] = {}  # the calls this node owns
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._store_down = False
        self._http: httpx.AsyncClient | None = None
        if self.shared:
            calls.call_id_prefix = f"rtc_{self.node_id}_"

    # ------------------------------------------------------------------ registry

    def info(self) -> NodeInfo:
        return NodeInfo(node_id=self.node_id, url=self.url, ice_addresses=self.ice_addresses,
                        active_sessions=self.admission.active, max_sessions=self.admission.max_sessions,
                        draining=self.admission.draining, updated_at=time.time())

    async def start(self) -> None:
        if self.shared and self._task is None:
            await self.beat()
            self._task = asyncio.create_task(self._heartbeat(), name="node-heartbeat")
            log.info("node %s (%s) shares state; heartbeat every %gs", self.node_id, self.url, self.heartbeat_s)

    async def stop(self) -> None:
        """Leave the registry at shutdown (a killed node's entries expire instead)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._pending:  # the releases of the calls shutdown just ended: let them reach the store
            _, late = await asyncio.wait(list(self._pending), timeout=2 * self.state_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self.shared:
            with contextlib.suppress(StateUnavailable):
                await self.state.nodes.withdraw(self.node_id)
                for call_id in list(self.records):
                    await self.state.calls.release(call_id)
        if self._http is not None:
            await self._http.aclose()

    async def beat(self) -> bool:
        """Announce this node and re-record its live calls; False (logged once) while the store is down."""
        live = {c.id for c in self.calls.live()}
        for call_id in [c for c in self.records if c not in live]:
            del self.records[call_id]
        try:
            await self.state.nodes.announce(self.info(), self.ttl_s)
            await self.state.calls.refresh(list(self.records.values()), self.ttl_s)
        except StateUnavailable as exc:
            if not self._store_down:
                log.warning("node %s: the shared state store is unreachable (%s); calls go on, the "
                            "registry is written again when it is back", self.node_id, exc)
            self._store_down = True
            return False
        if self._store_down:
            log.info("node %s: the shared state store is reachable again", self.node_id)
        self._store_down = False
        return True

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat()
            except Exception:  # never let the heartbeat die: the node would vanish from the registry
                log.exception("node %s: heartbeat failed", self.node_id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def claim(self, call_id: str, account: str | None, ek_digest: str | None) -> None:
        """Record a call this node now owns (best-effort; the heartbeat retries)."""
        if not self.shared:
            return
        record = CallRecord(call_id=call_id, node_id=self.node_id, account=account, ek_digest=ek_digest,
                            created_at=time.time())
        self.records[call_id] = record
        with contextlib.suppress(StateUnavailable):
            await self.state.calls.claim(record, self.ttl_s)

    def call_ended(self, call_id: str) -> None:
        if self.records.pop(call_id, None) is not None:
            self._spawn(self._release(call_id))

    async def _release(self, call_id: str) -> None:
        with contextlib.suppress(StateUnavailable):
            await self.state.calls.release(call_id)

    async def owner_of(self, call_id: str) -> NodeInfo | None:
        """The live node that owns `call_id` (None: no such call on any live node)."""
        if not self.shared:
            return None
        try:
            record = await self.state.calls.get(call_id)
            node_id = record.node_id if record is not None else None
            if node_id is None or node_id == self.node_id:
                return None
            return await self.state.nodes.get(node_id)
        except StateUnavailable as exc:
            raise APIError(503, "The shared state store is unreachable, so the node that owns this call "
                           "cannot be found; try again shortly.", type="server_error",
                           code="state_unavailable") from exc

    # ------------------------------------------------------------------ forwarding

    def _headers(self, headers: Any) -> dict[str, str]:
        out = {k: headers[k] for k in _FORWARD_HEADERS if k in headers}
        out[FORWARDED_HEADER] = self.node_id
        return out

    async def forward_hangup(self, owner: NodeInfo, call_id: str, headers: Any) -> Response:
        """POST the hangup to the owning node and answer with what it answered."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=_FORWARD_TIMEOUT_S)
        url = f"{owner.url}/v1/realtime/calls/{call_id}/hangup"
        try:
            reply = await self._http.post(url, headers=self._headers(headers))
        except httpx.HTTPError as exc:
            log.warning("hangup of %s: node %s at %s did not answer (%s)", call_id, owner.node_id, owner.url, exc)
            raise APIError(502, f"The node that owns call '{call_id}' did not answer; try again.",
                           type="server_error", code="node_unreachable") from exc
        relayed = ("content-type", "retry-after", "www-authenticate")
        keep = {k: v for k, v in reply.headers.items() if k.lower() in relayed}
        return Response(reply.content, status_code=reply.status_code, headers=keep)

    async def proxy_sideband(self, ws: WebSocket, owner: NodeInfo, call_id: str) -> None:
        """Open the sideband on the owner and relay both ways (its refusal, if any, is the client's)."""
        base = owner.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        offered = list(ws.scope.get("subprotocols") or [])
        try:
            upstream = await connect(f"{base}/v1/realtime?call_id={call_id}",
                                     additional_headers=self._headers(ws.headers),
                                     subprotocols=offered or None,  # type: ignore[arg-type]
                                     max_size=None, open_timeout=_FORWARD_TIMEOUT_S,
                                     ping_interval=None)
        except InvalidStatus as exc:
            reply = exc.response
            await ws.send_denial_response(Response(bytes(reply.body or b""), status_code=reply.status_code,
                                                   media_type=reply.headers.get("content-type")))
            return
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            log.warning("sideband for %s: node %s at %s did not answer (%s)", call_id, owner.node_id, owner.url, exc)
            await ws.send_denial_response(Response(
                b'{"error": {"message": "The node that owns this call did not answer; try again.", '
                b'"type": "server_error", "param": null, "code": "node_unreachable"}}',
                status_code=502, media_type="application/json"))
            return
        async with upstream:
            await ws.accept(subprotocol=upstream.subprotocol)
            await _relay(ws, upstream)


async def _relay(ws: WebSocket, upstream: ClientConnection) -> None:
    """Copy messages both ways until either side closes; the other side is then closed too."""

    async def down() -> None:  # owner -> client
        async for message in upstream:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_text(message)

    async def up() -> None:  # client -> owner
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await upstream.send(msg["text"])
            elif msg.get("bytes") is not None:
                await upstream.send(msg["bytes"])

    tasks = [asyncio.create_task(down(), name="sideband-down"), asyncio.create_task(up(), name="sideband-up")]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    code = upstream.close_code or 1000
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, ConnectionClosed):
        await upstream.close()
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await ws.close(code=code if code != 1006 else 1011, reason=(upstream.close_reason or "")[:120])
