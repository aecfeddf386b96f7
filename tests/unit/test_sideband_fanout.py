"""RealtimeSession.subscribe: extra readers of a session's events (what a sideband reads)."""

from __future__ import annotations

import asyncio
import json

from openrealtime.engine import RealtimeSession

from .test_engine import ScriptedLLM, drain, make_session, send, user_text


def pending(queue: asyncio.Queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_subscriber_gets_the_same_events_as_the_outbox_from_when_it_subscribed():
    s = make_session(ScriptedLLM(["Hi", "!"]))
    await s.start()
    queue = s.subscribe()
    await send(s, user_text("hello"))
    await send(s, {"type": "response.create", "response": {"output_modalities": ["text"]}})
    outbox = await drain(s, "response.done")
    assert outbox[0]["type"] == "session.created"  # sent before the subscriber existed
    seen = pending(queue)
    assert seen == outbox[1:]
    assert [e["type"] for e in seen][:2] == ["conversation.item.added", "conversation.item.done"]
    assert seen[-1]["type"] == "response.done"
    await s.close()


async def test_unsubscribed_queue_gets_nothing_more():
    s = make_session(ScriptedLLM(["x"]))
    await s.start()
    queue = s.subscribe()
    await send(s, user_text("one"))
    assert len(pending(queue)) == 2
    s.unsubscribe(queue)
    s.unsubscribe(queue)  # idempotent
    await send(s, user_text("two"))
    assert pending(queue) == []
    assert s.subscriber_count == 0
    await s.close()


async def test_slow_subscriber_is_dropped_and_the_session_and_others_go_on():
    s = make_session(ScriptedLLM(["x"]))
    await s.start()
    slow = s.subscribe(limit=3)
    fast = s.subscribe()
    for i in range(4):  # 8 events: the slow queue passes its limit
        await send(s, user_text(f"m{i}"))
    assert pending(slow) == [None]  # its backlog discarded, then told it is over
    assert s.subscriber_count == 1
    assert len([e for e in pending(fast) if e is not None]) == 8
    await send(s, user_text("after"))
    assert pending(slow) == []
    assert [e["type"] for e in pending(fast)] == ["conversation.item.added", "conversation.item.done"]
    assert len(await drain(s)) == 1 + 10  # session.created and every item event: never blocked
    assert not s.closed
    await s.close()


async def test_close_delivers_none_to_every_subscriber_and_later_ones():
    s = make_session(ScriptedLLM(["x"]))
    await s.start()
    queues = [s.subscribe(), s.subscribe()]
    await s.close()
    for queue in queues:
        assert pending(queue) == [None]
    assert s.subscriber_count == 0
    late = s.subscribe()
    assert pending(late) == [None]
    assert s.subscriber_count == 0


async def test_error_caused_by_any_client_reaches_subscribers():
    s: RealtimeSession = make_session(ScriptedLLM(["x"]))
    await s.start()
    queue = s.subscribe()
    await s.handle_text(json.dumps({"type": "no.such.event", "event_id": "evt_1"}))
    (event,) = pending(queue)
    assert event["type"] == "error" and event["error"]["event_id"] == "evt_1"
    await s.close()
