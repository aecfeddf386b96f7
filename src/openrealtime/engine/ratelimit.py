"""Per-API-key rate limits: requests and tokens per minute, shared by every session of the key.

Each limit is a bucket that refills continuously (``limit`` per minute) up to ``limit``. Starting a
response takes one request; when it is done its total tokens (input + output) are taken from the
token bucket, which may go below zero: the key then waits until it has refilled. A response is
refused while either bucket is empty. ``rate_limits.updated`` reports each configured limit with
what remains and how long until the bucket is full again; limits that are not configured
(unlimited) are left out of the list.

The buckets live in a `BucketStore`: this process's memory (one node; checked synchronously, so a
refusal answers `response.create` at once), or a store shared by all nodes (`state_url`), where a
response checks its key's buckets before `response.created` and charges its tokens after
`response.done`. When the shared store cannot be reached, `fail_open` decides: refuse the response
(`rate_limit_unavailable`, the default) or let it run unlimited and log it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..state.base import BucketStore, StateUnavailable
from ..state.memory import MemoryBucketStore

log = logging.getLogger(__name__)

LimitName = Literal["requests", "tokens"]
# How often a fail-open limiter says again that it is letting responses through unchecked.
_WARN_EVERY_S = 30.0


@dataclass(slots=True)
class RateLimitExceeded:
    """Why a response was refused: reported as an `error` event (type = the limit's name)."""

    name: LimitName
    limit: int
    retry_after_s: float

    @property
    def code(self) -> str:
        return "rate_limit_exceeded"

    @property
    def type(self) -> str:
        return self.name

    @property
    def message(self) -> str:
        unit = "RPM" if self.name == "requests" else "TPM"
        return (f"Rate limit reached on {self.name} per min ({unit}): Limit {self.limit}. "
                f"Please try again in {self.retry_after_s:.1f}s.")


@dataclass(slots=True)
class RateLimitUnavailable:
    """The shared store could not be asked and the policy is to refuse (fail closed)."""

    @property
    def code(self) -> str:
        return "rate_limit_unavailable"

    @property
    def type(self) -> str:
        return "server_error"

    @property
    def message(self) -> str:
        return ("Rate limits cannot be checked right now (the shared state store is unreachable); "
                "please try again shortly.")


Refusal = RateLimitExceeded | RateLimitUnavailable


def _seconds_until(limit: int, level: float, target: float) -> float:
    return max(0.0, (target - level) * 60.0 / limit)


class RateLimiter:
    """Token buckets per key; ``None`` limits are unlimited."""

    def __init__(self, requests_per_min: int | None = None, tokens_per_min: int | None = None,
                 clock: Callable[[], float] = time.monotonic, *, store: BucketStore | None = None,
                 fail_open: bool = False):
        self.limits: dict[LimitName, int] = {}
        if requests_per_min is not None and requests_per_min > 0:
            self.limits["requests"] = int(requests_per_min)
        if tokens_per_min is not None and tokens_per_min > 0:
            self.limits["tokens"] = int(tokens_per_min)
        self.store: BucketStore = store if store is not None else MemoryBucketStore(clock)
        self.fail_open = fail_open
        self._last_warning = -math.inf

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    @property
    def shared(self) -> bool:
        """Buckets in a store other nodes share: asked asynchronously (`try_start_shared`)."""
        return not isinstance(self.store, MemoryBucketStore)

    @staticmethod
    def identity(api_key: str | None) -> str:
        """Buckets are keyed by a digest, so the limiter never holds key values."""
        if not api_key:
            return "anonymous"
        return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def _local(self) -> MemoryBucketStore:
        assert isinstance(self.store, MemoryBucketStore), "a shared limiter is asked asynchronously"
        return self.store

    def _refusal(self, levels: Mapping[str, float], name: str) -> RateLimitExceeded:
        limit = self.limits[name]  # type: ignore[index]
        return RateLimitExceeded(name, limit, round(_seconds_until(limit, levels[name], 1.0), 1))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- one node (synchronous)

    def try_start(self, api_key: str | None) -> RateLimitExceeded | None:
        """Take one request for a new response, or say which limit refuses it."""
        if not self.limits:
            return None
        charge = {"requests": 1.0} if "requests" in self.limits else {}
        result = self._local().apply_now(self.identity(api_key), self.limits, check=True, charge=charge)
        return None if result.ok else self._refusal(result.levels, result.refused or "")

    def add_tokens(self, api_key: str | None, tokens: int) -> None:
        """Charge a finished response's tokens."""
        if "tokens" in self.limits and tokens > 0:
            self._local().apply_now(self.identity(api_key), self.limits, charge={"tokens": float(tokens)})

    def snapshot(self, api_key: str | None) -> list[dict[str, Any]]:
        """The `rate_limits` list of `rate_limits.updated` for this key."""
        if not self.limits:
            return []
        return self._report(self._local().apply_now(self.identity(api_key), self.limits).levels)

    def _report(self, levels: Mapping[str, float]) -> list[dict[str, Any]]:
        return [{"name": name, "limit": limit, "remaining": max(0, math.floor(levels[name])),
                 "reset_seconds": round(_seconds_until(limit, levels[name], limit), 3)}
                for name, limit in self.limits.items()]

    # ---------------------------------------------------------------- shared store (asynchronous)

    def _unavailable(self, exc: StateUnavailable, what: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("rate limits: the shared state store is unreachable (%s); %s", exc,
                        what if self.fail_open else "responses are refused (state_failure_policy=closed)")

    async def try_start_shared(self, api_key: str | None) -> Refusal | None:
        """`try_start` against the shared store, with the failure policy applied."""
        if not self.limits:
            return None
        charge = {"requests": 1.0} if "requests" in self.limits else {}
        try:
            result = await self.store.apply(self.identity(api_key), self.limits, check=True, charge=charge)
        except StateUnavailable as exc:
            self._unavailable(exc, "responses run unchecked (state_failure_policy=open)")
            return None if self.fail_open else RateLimitUnavailable()
        return None if result.ok else self._refusal(result.levels, result.refused or "")

    async def charge_shared(self, api_key: str | None, tokens: int) -> list[dict[str, Any]] | None:
        """Charge a finished response's tokens; the new `rate_limits` list (None if the store is down)."""
        if not self.limits:
            return []
        charge = {"tokens": float(tokens)} if "tokens" in self.limits and tokens > 0 else {}
        try:
            result = await self.store.apply(self.identity(api_key), self.limits, charge=charge)
        except StateUnavailable as exc:
            self._unavailable(exc, "this response's tokens were not charged")
            return None
        return self._report(result.levels)
