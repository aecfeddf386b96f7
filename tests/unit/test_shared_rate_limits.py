"""Rate limits against a shared bucket store (several nodes): the asynchronous path of the engine.

The store here is the in-memory one behind a wrapper (so the limiter takes its shared path), or
one that is down; the real Redis store runs in tests/integration/test_state_backends.py and across
two real nodes in tests/e2e/test_multinode.py.
"""

from __future__ import annotations

from collections.abc import Mapping

from openrealtime.backends.llm import TextDelta
from openrealtime.engine.ratelimit import RateLimiter, RateLimitUnavailable
from openrealtime.state import BucketResult, StateUnavailable
from openrealtime.state.memory import MemoryBucketStore

from .test_engine import drain, send
from .test_tools_engine import Clock, ToolLLM, make_session, started


class RemoteBuckets:
    """A shared store as the limiter sees it: every step awaited (here: memory, or down)."""

    def __init__(self, clock: Clock) -> None:
        self.inner = MemoryBucketStore(clock)
        self.down = False
        self.calls = 0

    async def apply(self, key: str, limits: Mapping[str, int], *, check: bool = False,
                    charge: Mapping[str, float] | None = None) -> BucketResult:
        self.calls += 1
        if self.down:
            raise StateUnavailable("connection refused")
        return self.inner.apply_now(key, limits, check=check, charge=charge)


async def test_a_shared_refusal_comes_before_response_created_and_the_session_goes_on():
    clock = Clock()
    store = RemoteBuckets(clock)
    limiter = RateLimiter(requests_per_min=2, tokens_per_min=1000, store=store)
    assert limiter.shared
    llm = ToolLLM([[TextDelta("ok")], [TextDelta("ok")], [TextDelta("ok")]])
    s = make_session(llm, limiter=limiter, api_key="sk-a")
    other = make_session(llm, limiter=limiter, api_key="sk-a")  # same key, e.g. on another node
    await started(s, {"output_modalities": ["text"]})
    await started(other, {"output_modalities": ["text"]})
    await send(s, {"type": "response.create"})
    events = await drain(s, "rate_limits.updated")
    assert [e["type"] for e in events][-2:] == ["response.done", "rate_limits.updated"]
    by_name = {x["name"]: x for x in events[-1]["rate_limits"]}
    assert by_name["requests"]["remaining"] == 1 and by_name["tokens"]["remaining"] < 1000  # tokens charged
    await send(other, {"type": "response.create"})
    await drain(other, "rate_limits.updated")
    await send(s, {"type": "response.create", "event_id": "third"})
    [err] = await drain(s)  # only the error: no response.created, no response.done
    assert err["type"] == "error" and err["error"]["code"] == "rate_limit_exceeded"
    assert err["error"]["type"] == "requests" and err["error"]["event_id"] == "third"
    assert s._active is None and not s._runs  # the slot is free: a new response may start later
    clock.t += 31
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"
    await s.close()
    await other.close()


async def test_fail_closed_refuses_with_rate_limit_unavailable_and_fail_open_lets_it_run():
    clock = Clock()
    store = RemoteBuckets(clock)
    store.down = True
    closed = RateLimiter(requests_per_min=5, store=store)
    assert isinstance(await closed.try_start_shared("k"), RateLimitUnavailable)
    assert await closed.charge_shared("k", 10) is None  # not charged, no rate_limits.updated
    opened = RateLimiter(requests_per_min=5, store=store, fail_open=True)
    assert await opened.try_start_shared("k") is None

    s = make_session(ToolLLM([[TextDelta("ok")]]), limiter=closed, api_key="sk-a")
    await started(s, {"output_modalities": ["text"]})
    await send(s, {"type": "response.create", "event_id": "e1"})
    [err] = await drain(s)
    assert err["error"]["code"] == "rate_limit_unavailable" and err["error"]["event_id"] == "e1"
    store.down = False  # back: the next response runs
    await send(s, {"type": "response.create"})
    assert (await drain(s, "response.done"))[-1]["response"]["status"] == "completed"
    await s.close()


async def test_unlimited_keys_never_ask_the_store():
    store = RemoteBuckets(Clock())
    s = make_session(ToolLLM([[TextDelta("ok")]]), limiter=RateLimiter(store=store), api_key="sk-a")
    await started(s, {"output_modalities": ["text"]})
    await send(s, {"type": "response.create"})
    await drain(s, "response.done")
    await s.close()
    assert store.calls == 0


async def test_memory_buckets_forget_only_full_keys():
    clock = Clock()
    store = MemoryBucketStore(clock)
    limits = {"tokens": 60}
    store.apply_now("spent", limits, charge={"tokens": 600.0})  # 10 min in debt
    clock.t += 120
    assert store.apply_now("spent", limits).levels["tokens"] < 0  # still in debt after 2 minutes
    assert store.apply_now("spent", limits, check=True).refused == "tokens"
