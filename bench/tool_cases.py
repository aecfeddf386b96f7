"""The scored tool-call suite's tools and requests (used by ``bench/tool_calls.py`` and the tests).

Five tools with realistic schemas and requests of four kinds: ones that need one call, ones that
need none, ones that need two, and follow-ups whose conversation already holds a call and its
output (the reply must answer from the output, without calling again). ``spoken`` requests reach
the server as synthesized speech, the others as text items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Get the current weather and temperature for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
    {
        "type": "function",
        "name": "create_calendar_event",
        "description": "Add an event to the user's calendar.",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "date": {"type": "string", "description": "Day of the event, e.g. 2026-12-03 or 'next Monday'"},
                "time": {"type": "string", "description": "Start time, e.g. 15:00"},
                "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 600},
            },
            "required": ["title", "date", "time"],
        },
    },
    {
        "type": "function",
        "name": "web_search",
        "description": "Search the web for current information, news, prices or facts you do not know.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
    {
        "type": "function",
        "name": "lookup_order",
        "description": "Look up the status of a customer's order by its order number.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "description": "The order number, digits only"}},
            "required": ["order_id"],
        },
    },
    {
        "type": "function",
        "name": "convert_units",
        "description": "Convert a quantity from one unit to another (length, weight, volume, temperature).",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "from_unit": {"type": "string"},
                "to_unit": {"type": "string"},
            },
            "required": ["value", "from_unit", "to_unit"],
        },
    },
]

TOOL_NAMES = [t["name"] for t in TOOLS]


@dataclass(frozen=True)
class Call:
    """An expected call: the tool, and words its arguments must contain (case-insensitive)."""

    name: str
    contains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    id: str
    request: str
    calls: tuple[Call, ...] = ()  # what the reply must call (empty: no tool)
    spoken: bool = False
    # A follow-up: the call the assistant already made for `request`, and its output. The reply
    # must answer from it (mention one of `answer_contains`, case-insensitive) and call nothing.
    prior_call: tuple[str, dict[str, Any]] | None = None
    prior_output: str | None = None
    answer_contains: tuple[str, ...] = field(default_factory=tuple)


def _one(name: str, *words: str) -> tuple[Call, ...]:
    return (Call(name, tuple(words)),)


CASES: list[Case] = [
    # One call.
    Case("weather-paris", "What's the weather in Paris?", _one("get_weather", "paris"), spoken=True),
    Case("weather-tokyo", "Is it raining in Tokyo right now?", _one("get_weather", "tokyo")),
    Case("weather-london-f", "How hot is it in London today, in Fahrenheit?", _one("get_weather", "london")),
    Case("weather-berlin", "Do I need a jacket in Berlin today?", _one("get_weather", "berlin"), spoken=True),
    Case("weather-sydney", "Tell me the temperature in Sydney.", _one("get_weather", "sydney")),
    Case("cal-dentist", "Put a dentist appointment in my calendar for Friday at 3pm.",
         _one("create_calendar_event", "dentist"), spoken=True),
    Case("cal-meeting", "Schedule a team meeting tomorrow at 10:00 for 30 minutes.",
         _one("create_calendar_event", "meeting")),
    Case("cal-lunch", "Add lunch with Maria on December 5th at noon to my calendar.",
         _one("create_calendar_event", "maria")),
    Case("cal-gym", "Remind me of my gym session next Monday at 7 in the morning by adding it to my calendar.",
         _one("create_calendar_event", "gym")),
    Case("search-news", "Search the web for the latest news about the Mars rover.", _one("web_search", "mars")),
    Case("search-price", "Look up the current price of a Tesla Model 3.", _one("web_search", "tesla"), spoken=True),
    Case("search-score", "Who won the football game last night? Search for it.", _one("web_search")),
    Case("search-opening", "Find out when the Louvre opens tomorrow.", _one("web_search", "louvre")),
    Case("order-1", "Where is my order 48213?", _one("lookup_order", "48213"), spoken=True),
    Case("order-2", "Can you check the status of order number 77120?", _one("lookup_order", "77120")),
    Case("order-3", "My package hasn't arrived, the order is 90331.", _one("lookup_order", "90331")),
    Case("order-4", "Has order 55512 shipped yet?", _one("lookup_order", "55512")),
    Case("conv-miles", "Convert 10 miles to kilometers.", _one("convert_units", "mile", "kilomet"), spoken=True),
    Case("conv-pounds", "How many kilograms is 150 pounds?", _one("convert_units", "pound", "kilogram")),
    Case("conv-temp", "What is 350 degrees Fahrenheit in Celsius?", _one("convert_units", "fahrenheit", "celsius")),
    Case("conv-cups", "Convert 2 cups to milliliters.", _one("convert_units", "cup", "millilit")),
    # No tool.
    Case("none-hello", "Hello! How are you today?", spoken=True),
    Case("none-joke", "Tell me a short joke."),
    Case("none-capital", "What is the capital of Italy?"),
    Case("none-thanks", "Thanks, that's all I needed.", spoken=True),
    Case("none-math", "What is seven times eight?"),
    Case("none-name", "What's your name?"),
    Case("none-advice", "Give me one tip for sleeping better."),
    Case("none-define", "What does the word 'ephemeral' mean?"),
    Case("none-poem", "Say a two line poem about the sea."),
    Case("none-spell", "How do you spell 'necessary'?"),
    # Two calls.
    Case("two-weather", "What's the weather in Paris and in Rome?",
         (Call("get_weather", ("paris",)), Call("get_weather", ("rome",))), spoken=True),
    Case("two-orders", "Check the status of orders 11111 and 22222.",
         (Call("lookup_order", ("11111",)), Call("lookup_order", ("22222",)))),
    Case("two-mixed", "What's the weather in Madrid, and convert 5 kilometers to miles.",
         (Call("get_weather", ("madrid",)), Call("convert_units", ("kilomet", "mile")))),
    Case("two-conv", "Convert 3 feet to meters and 20 liters to gallons.",
         (Call("convert_units", ("feet", "met")), Call("convert_units", ("lit", "gallon")))),
    Case("two-cal", "Add a call with Bob on Monday at 9am and a review with Ann on Tuesday at 2pm to my calendar.",
         (Call("create_calendar_event", ("bob",)), Call("create_calendar_event", ("ann",)))),
    # Follow-ups after a tool result.
    Case("follow-weather", "What's the weather in Paris?",
         prior_call=("get_weather", {"city": "Paris"}),
         prior_output='{"city": "Paris", "temperature_c": 18, "condition": "sunny"}',
         answer_contains=("18",), spoken=True),
    Case("follow-order", "Where is my order 48213?",
         prior_call=("lookup_order", {"order_id": "48213"}),
         prior_output='{"order_id": "48213", "status": "shipped", "carrier": "DHL", "eta": "Thursday"}',
         answer_contains=("thursday",)),
    Case("follow-conv", "Convert 10 miles to kilometers.",
         prior_call=("convert_units", {"value": 10, "from_unit": "miles", "to_unit": "kilometers"}),
         prior_output='{"result": 16.09, "unit": "kilometers"}', answer_contains=("16",)),
    Case("follow-search", "Who won the Tour de France this year?",
         prior_call=("web_search", {"query": "Tour de France winner"}),
         prior_output='{"results": [{"title": "Tadej Pogacar wins the Tour de France", "snippet": '
                      '"Pogacar took his fourth title in Paris."}]}',
         answer_contains=("pogacar",)),
    Case("follow-cal", "Schedule a team meeting tomorrow at 10:00.",
         prior_call=("create_calendar_event", {"title": "Team meeting", "date": "tomorrow", "time": "10:00"}),
         prior_output='{"status": "created", "event_id": "evt_7", "title": "Team meeting", "time": "10:00"}',
         answer_contains=("10",)),
    Case("follow-weather-2", "Is it cold in Oslo?",
         prior_call=("get_weather", {"city": "Oslo"}),
         prior_output='{"city": "Oslo", "temperature_c": -4, "condition": "snow"}',
         answer_contains=("snow", "-4", "minus 4", "4 degrees", "four")),
]
