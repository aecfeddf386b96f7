"""Hostile orderings and input against the engine: nothing wedges or poisons a session (issue 10)."""

from __future__ import annotations

import json

from openrealtime.protocol.text import dumps_event, find_lone_surrogate
from openrealtime.transports.webrtc import fit_message

from .test_engine import ScriptedLLM, drain, make_session, send
from .test_voice_engine import append, quiet, tone, voice_session


async def _normal_turn_works(session) -> None:
    await send(session, {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    await send(session, {"type": "response.create"})
    events = await drain(session, "response.done")
    done = events[-1]
    assert done["response"]["status"] == "completed", done
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello there"


async def test_create_then_cancel_at_once_ends_in_done_and_frees_the_slot():
    session = make_session(ScriptedLLM(["Hello", " there"], delay=0.01))
    await session.start()
    for _ in range(8):
        await send(session, {"type": "response.create"})
        await send(session, {"type": "response.cancel"})  # before the response task ever ran
        events = await drain(session, "response.done")
        types = [e["type"] for e in events]
        assert "error" not in types, events
        assert types.count("response.created") == 1
        assert events[-1]["response"]["status"] == "cancelled"
        assert events[-1]["response"]["status_details"]["reason"] == "client_cancelled"
        created = next(e for e in events if e["type"] == "response.created")
        assert created["response"]["id"] == events[-1]["response"]["id"]
        assert created["response"]["status"] == "in_progress"
    await _normal_turn_works(session)
    await session.close()


async def test_speech_resuming_in_the_append_that_ended_the_turn_does_not_wedge():
    """Turn ends and speech restarts inside one append: the auto response is cancelled before it ran."""
    llm = ScriptedLLM(["Hello", " there"], delay=0.01)
    s = voice_session(llm)
    await s.start()
    await send(s, {"type": "session.update", "session": {"output_modalities": ["text"], "audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    await drain(s)
    # one append: speech, a silence long enough to end the turn, then speech again
    await append(s, tone(600) + quiet(500) + tone(600), chunk_ms=1700)
    events = await drain(s, "response.done")
    assert events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["status_details"]["reason"] == "turn_detected"
    await append(s, quiet(600))  # the second turn ends: it is answered, nothing is stuck
    events = await drain(s, "response.done")
    assert events[-1]["response"]["status"] == "completed"
    assert not any(e["type"] == "error" for e in events), events
    await _normal_turn_works(s)
    await s.close()


async def test_lone_surrogate_is_refused_and_never_poisons_the_conversation():
    session = make_session(ScriptedLLM(["Hello", " there"]))
    await session.start()
    await drain(session)
    raw = '{"type": "conversation.item.create", "event_id": "ev\\ud800x", "item": {"type": "message", ' \
          '"role": "user", "content": [{"type": "input_text", "text": "a\\udc00b"}]}}'
    await session.handle_text(raw)
    events = await drain(session)
    assert [e["type"] for e in events] == ["error"]
    err = events[0]["error"]
    assert err["code"] == "invalid_value" and err["param"] == "item.content[0].text"
    assert err["event_id"] == "ev\ufffdx"
    dumps_event(events[0]).encode("utf-8")
    # an unknown type with a surrogate is refused the same way, and the reply is encodable
    await session.handle_text('{"type": "x\\ud800y"}')
    events = await drain(session)
    assert events[0]["error"]["param"] == "type"
    dumps_event(events[0]).encode("utf-8")
    await _normal_turn_works(session)
    await session.close()


async def test_deep_nesting_is_a_client_error_and_later_updates_work():
    session = make_session(ScriptedLLM(["Hello", " there"]))
    await session.start()
    await drain(session)
    for depth in (300, 985, 5000):
        deep = "[" * depth + "]" * depth
        await session.handle_text('{"type": "session.update", "event_id": "e1", "session": {"tracing": '
                                  '{"metadata": {"x": ' + deep + '}}}}')
        events = await drain(session)
        assert [e["type"] for e in events] == ["error"], events
        assert events[0]["error"]["code"] == "nesting_too_deep"
        assert events[0]["error"]["type"] == "invalid_request_error"
    await send(session, {"type": "session.update", "session": {"instructions": "Be terse."}})
    events = await drain(session, "session.updated")
    assert events[-1]["session"]["instructions"] == "Be terse."
    await _normal_turn_works(session)
    await session.close()


async def test_items_carry_null_transcript_and_hosted_fields():
    session = make_session(ScriptedLLM(["Hello", " there"]))
    await session.start()
    await drain(session)
    session.commit_audio(b"\x00\x00" * 16000, "item_audio1")
    events = await drain(session)
    added = next(e for e in events if e["type"] == "conversation.item.added")
    assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]
    assert added["item"]["status"] == "completed" and added["item"]["object"] == "realtime.item"
    await session.close()


def test_fit_message_drops_audio_then_errors():
    big = "A" * 300_000
    event = {"type": "conversation.item.retrieved", "event_id": "event_1", "item": {
        "id": "item_1", "type": "message", "role": "user", "status": "completed", "object": "realtime.item",
        "content": [{"type": "input_audio", "transcript": "hi", "audio": big}]}}
    text = fit_message(event, 262144)
    sent = json.loads(text)
    assert sent["type"] == "conversation.item.retrieved"
    assert sent["item"]["content"] == [{"type": "input_audio", "transcript": "hi"}]
    huge = {"type": "session.updated", "event_id": "event_2", "session": {"instructions": big}}
    sent = json.loads(fit_message(huge, 262144))
    assert sent["type"] == "error" and sent["error"]["code"] == "event_too_large"
    assert "session.updated" in sent["error"]["message"]
    assert fit_message(huge, 0) == dumps_event(huge)


def test_surrogate_finder_and_encoder():
    assert find_lone_surrogate({"a": ["ok", {"b": "x\ud800"}]}) == "a[1].b"
    assert find_lone_surrogate({"a": "\U0001F600 fine"}) is None
    text = dumps_event({"type": "error", "message": "x\ud800y"})
    text.encode("utf-8")
    assert json.loads(text)["message"] == "x\ud800y"


async def test_endless_speech_is_committed_at_the_buffer_cap(monkeypatch):
    """A stuck mic or noise that VAD takes for speech cannot grow one turn (and its STT) without bound."""
    from openrealtime.engine import input as engine_input

    monkeypatch.setattr(engine_input, "MAX_BUFFER_MS", 2000)
    s = voice_session(ScriptedLLM(["Hello", " there"]))
    await s.start()
    await send(s, {"type": "session.update", "session": {"output_modalities": ["text"], "audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    await drain(s)
    await append(s, tone(5000))  # five seconds of "speech", no pause
    await append(s, quiet(600))
    events = []
    while not events or events[-1]["response"]["status"] != "completed":
        events += await drain(s, "response.done")
    ends = [e["audio_end_ms"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert len(ends) == 3, ends  # cut at 2 s, cut again 2 s later, then the real end of speech
    assert 1900 <= ends[0] <= 2200 and 3900 <= ends[1] <= 4400 and ends[2] >= 5000, ends
    commits = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(commits) == 3
    await s.close()
