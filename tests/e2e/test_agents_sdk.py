"""The strict openai-agents SDK as a client: a RealtimeAgent's function tool, run by RealtimeRunner
against our WebSocket endpoint, completes a round trip (the tool really runs, its output goes back
and the model answers) with no validation errors on either side."""

from __future__ import annotations

import asyncio
import json

import pytest

from .conftest import Server

pytest.importorskip("agents", reason="openai-agents is not installed")
from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner
from agents.realtime.model_inputs import RealtimeModelSendRawMessage

pytestmark = pytest.mark.e2e


async def test_realtime_agent_tool_round_trip(server: Server):
    ran: list[dict] = []
    switched = asyncio.Event()

    @function_tool
    async def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        ran.append({"city": city})
        await asyncio.wait_for(switched.wait(), 30)
        return f"The weather in {city} is sunny and 23 degrees."

    agent = RealtimeAgent(name="Assistant", instructions="You are a weather assistant. Use the tools.",
                          tools=[get_weather])
    runner = RealtimeRunner(agent, config={"model_settings": {
        "model_name": "gpt-realtime",
        "output_modalities": ["text"],
        "tool_choice": "required",  # so that even SmolLM2 calls it (guided decoding)
        "turn_detection": None,
        "max_output_tokens": 48,
    }})
    session = await runner.run(model_config={"url": f"{server.ws_url}/v1/realtime?model=gpt-realtime",
                                             "api_key": server.api_key})
    errors: list = []
    tool_end = None
    server_events: list[dict] = []
    async with session:
        await session.send_message("What's the weather in Paris?")
        async with asyncio.timeout(120):
            async for event in session:
                if event.type == "error":
                    errors.append(event.error)
                elif event.type == "tool_start" and not switched.is_set():
                    # While the tool runs, let the model answer freely next (the SDK starts the next
                    # response itself as soon as it has sent the tool's output).
                    await session.model.send_event(RealtimeModelSendRawMessage(message={
                        "type": "session.update",
                        "other_data": {"session": {"type": "realtime", "tool_choice": "auto"}}}))
                    switched.set()
                elif event.type == "tool_end" and tool_end is None:
                    tool_end = event
                elif event.type == "raw_model_event":
                    data = event.data
                    if data.type == "error":
                        errors.append(data.error)
                    elif data.type == "raw_server_event" and isinstance(data.data, dict):
                        server_events.append(data.data)
                        if data.data.get("type") == "error":
                            errors.append(data.data)
                        dones = [e for e in server_events if e.get("type") == "response.done"]
                        if len(dones) >= 2:
                            break
    assert not errors, errors
    assert ran and ran[0]["city"], ran  # the function really ran, with a string argument
    assert tool_end is not None and json.loads(tool_end.arguments)["city"] == ran[0]["city"]
    assert tool_end.output.startswith("The weather in")
    first, second = [e["response"] for e in server_events if e.get("type") == "response.done"][:2]
    assert [o["type"] for o in first["output"]] == ["function_call"]
    call_id = first["output"][0]["call_id"]
    # The SDK sent the output back, our server took it, and the next response ran on it.
    outputs = [e for e in server_events if e.get("type") == "conversation.item.added"
               and e["item"]["type"] == "function_call_output"]
    assert outputs and outputs[0]["item"]["call_id"] == call_id and "sunny" in outputs[0]["item"]["output"]
    assert second["status"] in ("completed", "incomplete") and second["output"]
