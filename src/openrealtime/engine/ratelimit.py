"""Per-API-key rate limits: requests and tokens per minute, shared by every session of the key.

Each limit is a bucket that refills continuously (``limit`` per minute) up to ``limit``. Starting a
response takes one request; when it is done its total tokens (input + output) are taken from the
token bucket, which may go below zero: the key then waits until it has refilled. A response is
refused while either bucket is empty. ``rate_limits.updated`` reports each configured limit with
what remains and how long until the bucket is full again; limits that are not configured
(unlimited) are left out of the list.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

LimitName = Literal["requests", "tokens"]
# Buckets of keys not seen for this long are full again and can be forgotten.
_FORGET_AFTER_S = 120.0


@dataclass(slots=True)
class _Bucket:
    limit: int
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.stamp) * self.limit / 60.0)
        self.stamp = now

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) * 60.0 / self.limit)


@dataclass(slots=True)
class RateLimitExceeded:
    """Why a response was refused: reported as an `error` event (type = the limit's name)."""

    name: LimitName
    limit: int
    retry_after_s: float

    @property
    def message(self) -> str:
        unit = "RPM" if self.name == "requests" else "TPM"
        return (f"Rate limit reached on {self.name} per min ({unit}): Limit {self.limit}. "
                f"Please try again in {self.retry_after_s:.1f}s.")


class RateLimiter:
    """Token buckets per key; ``None`` limits are unlimited."""

    def __init__(self, requests_per_min: int | None = None, tokens_per_min: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits: dict[LimitName, int] = {}
        if requests_per_min is not None and requests_per_min > 0:
            self.limits["requests"] = int(requests_per_min)
        if tokens_per_min is not None and tokens_per_min > 0:
            self.limits["tokens"] = int(tokens_per_min)
        self._clock = clock
        self._buckets: dict[str, dict[LimitName, _Bucket]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    @staticmethod
    def identity(api_key: str | None) -> str:
        """Buckets are keyed by a digest, so the limiter never holds key values."""
        if not api_key:
            return "anonymous"
        return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def _get(self, key: str) -> dict[LimitName, _Bucket]:
        now = self._clock()
        buckets = self._buckets.get(key)
        if buckets is None:
            if len(self._buckets) > 10_000:
                self._forget(now)
            buckets = self._buckets[key] = {
                name: _Bucket(limit, float(limit), now) for name, limit in self.limits.items()
            }
        for bucket in buckets.values():
            bucket.refill(now)
        return buckets

    def _forget(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items()
                    if all(now - x.stamp > _FORGET_AFTER_S for x in b.values())]:
            del self._buckets[key]

    def try_start(self, api_key: str | None) -> RateLimitExceeded | None:
        """Take one request for a new response, or say which limit refuses it."""
        if not self.limits:
            return None
        buckets = self._get(self.identity(api_key))
        for name, bucket in buckets.items():
            if bucket.level < 1.0:
                return RateLimitExceeded(name, bucket.limit, round(bucket.seconds_until(1.0), 1))
        if "requests" in buckets:
            buckets["requests"].level -= 1.0
        return None

    def add_tokens(self, api_key: str | None, tokens: int) -> None:
        """Charge a finished response's tokens."""
        if "tokens" in self.limits and tokens > 0:
            self._get(self.identity(api_key))["tokens"].level -= tokens

    def snapshot(self, api_key: str | None) -> list[dict[str, Any]]:
        """The `rate_limits` list of `rate_limits.updated` for this key."""
        if not self.limits:
            return []
        out = []
        for name, bucket in self._get(self.identity(api_key)).items():
            out.append({
                "name": name,
                "limit": bucket.limit,
                "remaining": max(0, math.floor(bucket.level)),
                "reset_seconds": round(bucket.seconds_until(bucket.limit), 3),
            })
        return out
