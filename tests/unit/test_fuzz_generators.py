"""The fuzz generators (tests/fuzz_events.py): they cover every client event field, and each frame
gets what it is owed from an in-process session with a scripted LLM.

Fast (no server), so it runs many examples; a frame the generators mislabel fails here before the
e2e fuzz test (tests/e2e/test_fuzz.py) sends it to the real server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hypothesis import HealthCheck, Phase, given, settings

from openrealtime.engine import EngineContext, RealtimeSession
from openrealtime.protocol.events import CLIENT_EVENT_MODELS, ResponseConfig
from openrealtime.protocol.items import ContentPart, Item
from openrealtime.protocol.session import READ_ONLY_FIELDS, SessionConfig
from openrealtime.protocol.text import dumps_event
from tests.fuzz_events import MISSING, OUT_OF_RANGE, STRICT_OBJECTS, TARGETS, FuzzSession, SessionReport, session_plan

from .test_engine import ScriptedLLM


class InProcess:
    """The connection FuzzSession.run_on expects, straight into a RealtimeSession."""

    def __init__(self, session: RealtimeSession):
        self.session = session

    async def send(self, data: str | bytes) -> None:
        await self.session.handle_text(data)

    async def close(self) -> None:
        await self.session.close()

    async def __aiter__(self) -> AsyncIterator[str]:
        while (event := await self.session.outbox.get()) is not None:
            yield dumps_event(event)


def run_in_process(frames: list, vad: bool = False) -> SessionReport:
    async def main() -> SessionReport:
        llm = ScriptedLLM(["Hel", "lo", " there", "!"], delay=0.001)

        async def resolve(model: str | None) -> ScriptedLLM:
            return llm

        session = RealtimeSession(EngineContext(resolve_llm=resolve, default_model="m", default_instructions=""),
                                  transport="websocket")
        await session.start()
        fuzz = FuzzSession("", "", "u", vad=vad, response_wait_s=10, grace_s=0.01)
        await fuzz.run_on(InProcess(session), frames)
        return fuzz.finish()

    return asyncio.run(main())


def test_targets_cover_every_field_of_every_client_event():
    covered = {(t.type, t.path) for t in TARGETS}
    wanted = {(kind, (name,)) for kind, model in CLIENT_EVENT_MODELS.items() for name in model.model_fields
              if name != "type"}
    wanted |= {("session.update", ("session", name)) for name in SessionConfig.model_fields
               if name not in READ_ONLY_FIELDS}
    wanted |= {("conversation.item.create", ("item", name)) for name in Item.model_fields}
    wanted |= {("conversation.item.create", ("item", "content", 0, name)) for name in ContentPart.model_fields}
    wanted |= {("response.create", ("response", name)) for name in ResponseConfig.model_fields}
    assert wanted - covered == set()
    assert {t.type for t in STRICT_OBJECTS} == set(CLIENT_EVENT_MODELS)


def test_scaffolds_are_valid_events():
    """A target's scaffold must validate, or the error a wrong value causes may name another field."""
    for target in [*TARGETS, *STRICT_OBJECTS, *(t for t, _ in OUT_OF_RANGE), *(t for t, _ in MISSING)]:
        event = {"type": target.type, **target.scaffold}
        CLIENT_EVENT_MODELS[target.type].model_validate(event)
        if target.type == "session.update":
            SessionConfig.model_validate(event["session"])


def test_a_plain_session_passes():
    report = run_in_process([])
    assert report.problems == [] and report.final_status in ("completed", "incomplete")


@settings(max_examples=250, derandomize=True, database=None, deadline=None,
          phases=[Phase.explicit, Phase.generate],  # shrinking whole sessions takes minutes
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(session_plan(max_frames=25, max_responses=3, max_len=500, max_depth=600))
def test_every_frame_gets_what_it_is_owed_in_process(plan):
    report = run_in_process(plan)
    assert report.problems == [], "\n".join(report.problems)
