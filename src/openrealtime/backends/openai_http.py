"""HTTP plumbing shared by the OpenAI-compatible remote backends (LLM, STT and TTS).

One place for what every remote call needs: bearer auth, a connect timeout separate from the read
timeout, retries with exponential backoff on connect errors only (nothing was sent, so a retry is
always safe), and turning an upstream error response into a short readable message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

logger = logging.getLogger(__name__)

CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
_MAX_ERROR_BODY = 64 * 1024


class UpstreamFailure(Exception):
    """A remote call failed; ``code`` is one of upstream_unreachable / upstream_rate_limited /
    upstream_error / upstream_timeout / upstream_disconnected."""

    def __init__(self, message: str, code: str, status: int | None = None, body: Any = None,
                 upstream_code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.body = body
        self.upstream_code = upstream_code
        self.details = details or {}  # what else a client may want: url, attempts, timeout_s, retry_after


def upstream_error_message(body: Any, text: str) -> tuple[str, str | None]:
    """The error message and code of an OpenAI-shaped (or any other) error body."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or err.get("msg")
            code = err.get("code") or err.get("type")
            if message:
                return str(message), (str(code) if code is not None else None)
        elif isinstance(err, str):
            return err, None
        if isinstance(body.get("detail"), str):
            return body["detail"], None
    text = text.strip()
    return (text[:500] if text else "no error message"), None


async def read_error(response: httpx.Response, who: str) -> UpstreamFailure:
    """Read (at most 64 KiB of) a failed response and describe it."""
    raw = b""
    async for chunk in response.aiter_bytes():
        raw += chunk
        if len(raw) >= _MAX_ERROR_BODY:
            break
    text = raw[:_MAX_ERROR_BODY].decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = None
    message, upstream_code = upstream_error_message(parsed, text)
    status = response.status_code
    retry_after = response.headers.get("retry-after")
    return UpstreamFailure(f"Upstream {who} answered HTTP {status}: {message}",
                           classify_status(status, message, upstream_code), status,
                           parsed if parsed is not None else text[:2000], upstream_code,
                           {"retry_after": retry_after} if status == 429 and retry_after else None)


def malformed_response(who: str, problem: str) -> UpstreamFailure:
    """An answer of the wrong shape (a chunk with ``choices: 7``, a count that is a string, ...).

    The upstream's fault, not the client's and not ours: an ``upstream_error`` like any other
    upstream failure, so clients see a 502 / a failed response rather than a server error.
    """
    return UpstreamFailure(f"Upstream {who} sent a malformed response: {problem}", "upstream_error",
                           details={"reason": "malformed_response"})


def classify_status(status: int, message: str, upstream_code: str | None) -> str:
    """Our error code for an upstream HTTP failure (what clients see in status_details)."""
    if status == 429:
        return "upstream_rate_limited"
    if status in (401, 403):
        return "upstream_auth_failed"
    lowered = message.lower()
    if upstream_code == "context_length_exceeded" or "context length" in lowered or "context window" in lowered:
        return "context_length_exceeded"
    return "upstream_error"


class RemoteEndpoint:
    """Base URL, key, timeouts and retry policy of one OpenAI-compatible server."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 connect_timeout: float = 5.0, connect_retries: int = 2, retry_backoff_s: float = 0.25,
                 headers: dict[str, str] | None = None, name: str = "remote",
                 client: httpx.AsyncClient | Callable[[], httpx.AsyncClient] | None = None):
        """``client`` (or a function returning it, called on each request) lets several backends of
        one provider share a connection pool; its owner closes it, not ``close()``."""
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.timeout = timeout
        self.connect_retries = max(0, connect_retries)
        self.retry_backoff_s = retry_backoff_s
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._shared = client
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if isinstance(self._shared, httpx.AsyncClient):
            return self._shared
        if self._shared is not None:
            return self._shared()
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    @asynccontextmanager
    async def request(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """A streamed response with a success status; failures raise ``UpstreamFailure``.

        Connect errors are retried with backoff; the response is closed when the block exits,
        also on cancellation.
        """
        url = f"{self.base_url}/{path.lstrip('/')}"
        headers = {**self.headers, **kwargs.pop("headers", {})}
        attempt = 0
        while True:
            try:
                async with self.client().stream(method, url, headers=headers, timeout=self._timeout,
                                                **kwargs) as response:
                    if response.status_code >= 400:
                        raise await read_error(response, self.name)
                    try:
                        yield response
                    except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
                        raise self._timeout_failure() from exc
                    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                        raise UpstreamFailure(f"{self.name} ({self.base_url}) closed the connection mid-response: "
                                              f"{exc or type(exc).__name__}", "upstream_disconnected") from exc
                    return
            except CONNECT_ERRORS as exc:
                if attempt >= self.connect_retries:
                    raise UpstreamFailure(f"Cannot reach {self.name} at {self.base_url}: "
                                          f"{type(exc).__name__}: {exc or 'connection failed'}",
                                          "upstream_unreachable", details={"url": url, "attempts": attempt + 1}
                                          ) from exc
                delay = self.retry_backoff_s * (2 ** attempt)
                attempt += 1
                logger.info("%s: connecting to %s failed (%s); retry %d/%d in %.2fs", self.name, url, exc,
                            attempt, self.connect_retries, delay)
                await asyncio.sleep(delay)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
                raise self._timeout_failure() from exc
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                raise UpstreamFailure(f"{self.name} ({self.base_url}) closed the connection: "
                                      f"{exc or type(exc).__name__}", "upstream_disconnected") from exc
            except httpx.HTTPError as exc:
                raise UpstreamFailure(f"Request to {self.name} ({self.base_url}) failed: {exc}",
                                      "upstream_error") from exc

    def _timeout_failure(self) -> UpstreamFailure:
        return UpstreamFailure(f"{self.name} ({self.base_url}) sent nothing for {self.timeout:g}s",
                               "upstream_timeout", details={"timeout_s": self.timeout})

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
