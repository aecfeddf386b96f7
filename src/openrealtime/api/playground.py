"""The browser playground: a static page at `GET /` and the small same-origin routes it uses.

- `GET /` and `GET /playground/static/*`: plain HTML/JS/CSS from `openrealtime/web/` (no build step),
  with a strict Content-Security-Policy; the page never contains a key.
- `GET /playground/config`: how this page may get a key (`playground_mode`), and — when the request
  may mint one — the voices and models for the settings form.
- `POST /playground/session`: mints an ephemeral key (`ek_...`, the shape of
  `POST /v1/realtime/client_secrets`) for the page, guarded per `playground_mode`:

  - `loopback` (default): only requests from a loopback address, naming a loopback host (no DNS
    rebinding), and carrying no proxy headers (a reverse proxy on the same machine would otherwise
    make every visitor look local);
  - `token`: requests with `X-Playground-Token` equal to `playground_token` (constant-time compare);
  - `open`: anyone who can load the page (a public demo: the server's capacity is then public too);
  - `off`: never; the user pastes an API key or an ek into the page.

  Whatever the mode, a browser request from another origin is refused (`Origin` /
  `Sec-Fetch-Site`), so other web sites cannot mint keys through a visitor's browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..config import Settings
from .client_secrets import mint_response, read_json_body
from .errors import APIError

log = logging.getLogger("openrealtime")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
TOKEN_HEADER = "x-playground-token"
# The rate-limit account of every key the page mints.
PLAYGROUND_ACCOUNT = "playground"
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
# The page loads only its own files and talks only to its own origin (WebRTC media is not fetch).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'self' blob: mediastream:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # no clickjacking of the microphone permission
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


def _is_loopback_ip(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """`[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def is_local_request(request: Request) -> bool:
    """From this machine, to a loopback name, not relayed by a proxy."""
    client = request.client.host if request.client else None
    if not _is_loopback_ip(client):
        return False
    if any(h in request.headers for h in PROXY_HEADERS):
        return False
    name = _host_name(request.headers.get("host", "")).lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or _is_loopback_ip(name)


def check_same_origin(request: Request) -> None:
    """Refuse browser requests made by pages of another origin (CSRF, key theft via CORS)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        raise APIError(403, "The playground's key route only answers the playground page itself.",
                       code="cross_origin_request")
    origin = request.headers.get("origin")
    if origin is not None:
        # Host against host: behind a TLS proxy the page is https:// while this hop is plain http.
        if urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
            raise APIError(403, "The playground's key route only answers the playground page itself.",
                           code="cross_origin_request")


def may_mint(request: Request) -> tuple[bool, str]:
    """Whether this request may get a playground key, and why not."""
    settings: Settings = request.app.state.settings
    mode = settings.playground_mode
    if mode == "open":
        return True, ""
    if mode == "loopback":
        if is_local_request(request):
            return True, ""
        return False, ("This server hands out playground keys only to browsers on the server's own machine "
                       "(playground_mode=loopback). Paste an API key, or ask the operator.")
    if mode == "token":
        presented = request.headers.get(TOKEN_HEADER, "")
        expected = settings.playground_token or ""
        if presented and expected and hmac.compare_digest(presented.encode(), expected.encode()):
            return True, ""
        return False, ("This server needs the playground token for a key (playground_mode=token)"
                       + (": the token given is wrong." if presented else ".") + " Or paste an API key.")
    return False, "This server does not hand out playground keys (playground_mode=off): paste an API key."


def _voices(request: Request) -> list[dict[str, Any]]:
    speech = getattr(request.app.state, "speech", None)
    tts = getattr(speech, "tts", None)
    if tts is None:
        return []
    return [{"id": v.id, "name": v.name, "language": v.language} for v in tts.voices()]


def _models(request: Request) -> list[str]:
    llm = getattr(request.app.state, "llm", None)
    if llm is None:
        return []
    return [m["id"] for m in llm.available_models() if isinstance(m, dict) and "id" in m]


@router.get("/", include_in_schema=False)
async def playground_page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/playground/config", include_in_schema=False)
async def playground_config(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    allowed, reason = may_mint(request)
    engine = request.app.state.engine
    out: dict[str, Any] = {
        "mode": settings.playground_mode,
        "can_mint": allowed,
        "reason": reason,
        "token_required": settings.playground_mode == "token",
        "client_secret_ttl_s": settings.client_secret_ttl_s,
    }
    if allowed:
        out.update(voices=_voices(request), models=_models(request), default_model=engine.default_model,
                   audio_output=engine.audio_output)
    return out


@router.post("/playground/session", include_in_schema=False)
async def playground_session(request: Request) -> dict[str, Any]:
    """An ephemeral key for the page (body: optional `{"session": {...}}`)."""
    check_same_origin(request)
    allowed, reason = may_mint(request)
    if not allowed:
        raise APIError(403, reason, code="playground_key_refused")
    data = await read_json_body(request)
    extra = set(data) - {"session"}
    if extra:
        raise APIError(400, f"Unknown parameter: '{sorted(extra)[0]}'.", code="unknown_parameter",
                       param=sorted(extra)[0])
    # The page's keys share one account, so rate limits cap the playground as a whole.
    return await mint_response(request, data, PLAYGROUND_ACCOUNT)


def install_playground(app: FastAPI, settings: Settings) -> None:
    """Serve the page and its routes (unless `playground_enabled` is false)."""
    if not settings.playground_enabled:
        return
    if settings.playground_mode == "token" and not settings.playground_token:
        raise ValueError("playground_mode='token' needs playground_token (OPENREALTIME_PLAYGROUND_TOKEN)")
    app.include_router(router)
    app.mount("/playground/static", _StaticWithHeaders(directory=WEB_DIR), name="playground-static")
    log.info("Playground at http://%s:%s/ (keys: playground_mode=%s)", settings.host, settings.port,
             settings.playground_mode)


class _StaticWithHeaders(StaticFiles):
    """StaticFiles that adds the security headers to every file it serves."""

    def file_response(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response
