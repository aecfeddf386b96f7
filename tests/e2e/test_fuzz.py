"""Property-based fuzzing of real WebSocket sessions on the real server (issue: nothing a client
sends can wedge, kill or starve a session).

Each hypothesis example is one session: hostile frames from tests/fuzz_events.py with response
create/cancel bursts spliced in, then a normal text turn. FuzzSession checks every promise (one
error per bad event naming its event_id and param, none for valid ones, no server_error, every
server event valid for the SDK, one response.done per response, the session open, the final turn
completed); a separate heartbeat session measures how long the server's event loop ever stalls.
Seeded and bounded: the same examples every run, about a minute on two cores. `bench/fuzz.py`
runs the same generators for 100,000+ events.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from tests.fuzz_events import MARK, Frame, FuzzSession, Heartbeat, session_plan, ws_url

from .conftest import Server

pytestmark = pytest.mark.e2e

EXAMPLES = 40
# Longest the server's event loop may stall (a heartbeat round trip) while a session is fuzzed.
# Two shared CPU cores and a model generating alongside stay far below this.
STALL_LIMIT_S = 2.5
_names = itertools.count()

# Known hard cases, always run: a create/cancel race, a top-level event_id after 2700 levels of
# nesting with an `event_id` key at every level (finding the right one must stay cheap), a lone
# surrogate, and an event just over max_event_bytes (15 MiB: refused, the session goes on).
_RACE = [Frame("response_create", "maybe", event={"type": "response.create", "response": {
    "output_modalities": ["text"], "max_output_tokens": 4}}, starts_response=True),
    Frame("response_cancel", "maybe", event={"type": "response.cancel"}),
    Frame("response_create", "maybe", event={"type": "response.create", "response": {
        "output_modalities": ["text"], "max_output_tokens": 4}}, starts_response=True),
    Frame("response_cancel", "maybe", event={"type": "response.cancel"})]
_DEEP_IDS = Frame("deep_ids", "error", code="nesting_too_deep", raw=(
    '{"type":"session.update","session":{"type":"realtime","reasoning":'
    + '{"event_id":"inner","a":' * 2700 + "1" + "}" * 2700 + f'}},"event_id":"{MARK}"}}'))
_OVERSIZE = Frame("oversize", "error", echo="none", code="event_too_large",
                  raw='{"type":"input_audio_buffer.append","audio":"' + "A" * (15 * 1024 * 1024) + '"}')
_SURROGATE = Frame("surrogate", "error", event={"type": "session.update", "session": {"instructions": "a\ud800"}},
                   param="session.instructions", code="invalid_value")


@pytest.fixture(scope="module")
def heartbeat(server: Server) -> Iterator[Heartbeat]:
    with Heartbeat(ws_url(server.ws_url), server.api_key) as beat:
        yield beat


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          phases=[Phase.explicit, Phase.generate],  # shrinking would re-run sessions for minutes
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@example(plan=_RACE, vad=False)
@example(plan=[_DEEP_IDS, _SURROGATE, _OVERSIZE], vad=False)
@given(plan=session_plan(min_frames=10, max_frames=30, max_responses=2, max_len=20_000, max_depth=5000),
       vad=st.booleans())
def test_hostile_events_never_wedge_kill_or_starve_a_session(server: Server, heartbeat: Heartbeat,
                                                            plan: list[Frame], vad: bool):
    beats = len(heartbeat.rtts)
    fuzz = FuzzSession(ws_url(server.ws_url), server.api_key, f"f{next(_names)}", vad=vad)
    report = asyncio.run(fuzz.run(plan))
    time.sleep(3 * heartbeat.interval_s)  # the probe that waited out a stall has come back
    stall = max(heartbeat.rtts[beats:], default=0.0)
    note(f"{report.events_sent} events, {report.errors} errors, {report.responses_created} responses, "
         f"final turn {report.final_status}, worst heartbeat {stall:.2f} s")
    assert report.problems == [], "\n".join(report.problems)
    assert heartbeat.error is None, heartbeat.error
    assert stall < STALL_LIMIT_S, f"the server's event loop stalled for {stall:.1f} s"
