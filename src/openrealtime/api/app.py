"""FastAPI app factory: wires settings, backends and the engine context to the routes."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..backends.registry import LLMRegistry
from ..backends.speech_registry import load_speech_backends
from ..config import Settings
from ..engine import EngineContext
from ..engine.ratelimit import RateLimiter
from ..transports.webrtc import CallManager
from .auth import KeyChecker, require_key
from .calls import router as calls_router
from .client_secrets import ClientSecrets, MemoryClientSecretStore
from .client_secrets import router as client_secrets_router
from .errors import install_error_handlers
from .openai_compat import router as openai_compat_router
from .playground import install_playground
from .realtime_ws import router as ws_router

log = logging.getLogger("openrealtime")


def create_app(settings: Settings) -> FastAPI:
    """Build the app; models load lazily on first use (or eagerly with `preload`)."""
    llm = LLMRegistry(settings)
    speech = load_speech_backends(settings)
    ctx = EngineContext(
        resolve_llm=llm.resolve,
        default_model=settings.llm_model,
        default_instructions=settings.default_instructions,
        session_ttl_s=settings.session_ttl_s,
        max_event_bytes=settings.max_event_bytes,
        vad=speech.vad,
        stt=speech.stt,
        tts=speech.tts,
        turn_detector=speech.turn,
        noise=speech.noise,
        check_model=llm.validate,
        rate_limiter=RateLimiter(settings.rate_limit_requests_per_min, settings.rate_limit_tokens_per_min),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await app.state.calls.close()
            await llm.close()
            await speech.close()

    app = FastAPI(title="openrealtime", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.keys = KeyChecker(settings.api_keys)
    app.state.llm = llm
    app.state.speech = speech
    app.state.engine = ctx
    app.state.calls = CallManager(settings, ctx)
    app.state.client_secrets = ClientSecrets(MemoryClientSecretStore(), ttl_s=settings.client_secret_ttl_s)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"], expose_headers=["Location"])

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict:
        return {"object": "list", "data": llm.available_models()}

    @app.get("/v1/voices", dependencies=[Depends(require_key)])
    async def voices() -> dict:
        tts = speech.tts
        data = [] if tts is None else [
            {"id": v.id, "object": "voice", "name": v.name, "language": v.language, "aliases": list(v.aliases)}
            for v in tts.voices()
        ]
        return {"object": "list", "data": data}

    app.include_router(calls_router)
    app.include_router(ws_router)
    app.include_router(openai_compat_router)
    app.include_router(client_secrets_router)
    install_playground(app, settings)
    return app
