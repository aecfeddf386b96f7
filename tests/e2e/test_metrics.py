"""GET /metrics on the real server: keyed like /v1/models, and the counters follow real sessions."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.metrics_text import parse, total, value

from .conftest import Server, client, collect
from .webrtc_client import hangup, open_call

pytestmark = pytest.mark.e2e


async def scrape(server: Server) -> dict:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {server.api_key}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def settled(server: Server, name: str, want: float, **labels: str) -> dict:
    """Scrape until a gauge reaches `want` (sessions close a moment after the client goes)."""
    for _ in range(50):
        samples = await scrape(server)
        if value(samples, name, **labels) == want:
            return samples
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name}{labels} stayed at {value(samples, name, **labels)}, expected {want}")


async def test_metrics_need_the_api_key(server: Server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        missing = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer sk-wrong"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert "openrealtime_" not in missing.text


async def test_a_websocket_turn_moves_the_counters(server: Server):
    before = await scrape(server)
    assert value(before, "openrealtime_process_resident_memory_bytes") > 50 * 1024 * 1024  # models are loaded
    assert value(before, "openrealtime_process_threads") > 1
    assert value(before, "openrealtime_process_open_fds") > 3
    assert value(before, "openrealtime_asyncio_tasks") >= 1
    active = value(before, "openrealtime_sessions_active", transport="websocket")
    async with client(server).realtime.connect(model="gpt-realtime") as conn:
        await collect(conn, "session.created")
        during = await scrape(server)
        assert value(during, "openrealtime_sessions_active", transport="websocket") == active + 1
        await conn.send({"type": "conversation.item.delete", "item_id": "no-such-item", "event_id": "m1"})
        error = (await collect(conn, "error"))[-1]["error"]
        assert error["code"] == "item_not_found"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]})
        await conn.response.create(response={"max_output_tokens": 8})
        done = (await collect(conn, "response.done"))[-1]["response"]
    after = await settled(server, "openrealtime_sessions_active", active, transport="websocket")
    assert value(after, "openrealtime_sessions_total", transport="websocket") == \
        value(before, "openrealtime_sessions_total", transport="websocket") + 1
    status = done["status"]
    assert value(after, "openrealtime_responses_total", status=status) == \
        value(before, "openrealtime_responses_total", status=status) + 1
    assert total(after, "openrealtime_responses_total") == total(before, "openrealtime_responses_total") + 1
    assert value(after, "openrealtime_errors_sent_total", code="item_not_found") == \
        value(before, "openrealtime_errors_sent_total", code="item_not_found") + 1
    # delete, session.update, item.create, response.create
    assert value(after, "openrealtime_events_received_total") >= \
        value(before, "openrealtime_events_received_total") + 4


async def test_a_webrtc_call_is_counted_while_it_lasts(server: Server):
    before = await scrape(server)
    calls = value(before, "openrealtime_webrtc_calls_active")
    sessions = value(before, "openrealtime_sessions_active", transport="webrtc")
    peer, call_id, _ = await open_call(server)
    try:
        during = await scrape(server)
        assert value(during, "openrealtime_webrtc_calls_active") == calls + 1
        assert value(during, "openrealtime_sessions_active", transport="webrtc") == sessions + 1
    finally:
        assert (await hangup(server, call_id)).status_code == 200
        await peer.close()
    after = await settled(server, "openrealtime_webrtc_calls_active", calls)
    assert value(after, "openrealtime_sessions_active", transport="webrtc") == sessions
    assert value(after, "openrealtime_sessions_total", transport="webrtc") == \
        value(before, "openrealtime_sessions_total", transport="webrtc") + 1
