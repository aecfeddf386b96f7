"""FastAPI app factory: wires settings, backends and the engine context to the routes."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware

from ..backends.mcp_client import StreamableHttpMcp
from ..backends.registry import LLMRegistry
from ..backends.speech_registry import load_speech_backends
from ..backends.worker import set_thread_nice
from ..config import Settings
from ..engine import EngineContext
from ..engine.ratelimit import RateLimiter
from ..startup import Readiness
from ..state import open_state
from ..transports.webrtc import CallManager
from .admission import Admission, readiness_response
from .auth import KeyChecker, require_key
from .calls import router as calls_router
from .client_secrets import ClientSecrets
from .client_secrets import router as client_secrets_router
from .cluster import Cluster
from .errors import install_error_handlers
from .metrics import router as metrics_router
from .openai_compat import router as openai_compat_router
from .playground import install_playground
from .realtime_ws import router as ws_router

log = logging.getLogger("openrealtime")
# Longest wait for each shutdown step (see lifespan).
_SHUTDOWN_STEP_S = 5.0


def create_app(settings: Settings) -> FastAPI:
    """Build the app; models load lazily on first use (or eagerly with `preload`)."""
    set_thread_nice(llm=settings.llm_thread_nice, speech=settings.speech_thread_nice)
    llm = LLMRegistry(settings)
    speech = load_speech_backends(settings)
    # Ephemeral keys, rate-limit buckets and the node/call registries: this process, or shared (Redis).
    state = open_state(settings.state_url, prefix=settings.state_prefix, timeout_s=settings.state_timeout_s)
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
        effective_model=llm.effective,
        accepts_images=llm.accepts_images,
        voice_aliases={k.strip().lower(): v for k, v in settings.voice_aliases.items()},
        strict_names=settings.strict_names,
        first_chunk_words=settings.tts_first_words,
        trim_tts_silence=settings.tts_trim_silence,
        speculative_prefill=settings.llm_prefill,
        speculative_generation=settings.llm_speculate,
        prefill_words_ms=settings.llm_prefill_words_ms,
        speculate_after_ms=settings.stt_speculate_ms,
        partial_transcript_ms=settings.stt_partial_interval_ms,
        rate_limiter=RateLimiter(settings.rate_limit_requests_per_min, settings.rate_limit_tokens_per_min,
                                 store=state.buckets if state.shared else None,
                                 fail_open=settings.state_failure_policy == "open"),
        mcp=StreamableHttpMcp(),
        mcp_allowed_hosts=tuple(settings.mcp_allowed_hosts),
        mcp_timeout_s=settings.mcp_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio

        # `openrealtime serve` sets `warm_start`: load the models in the background while serving.
        warm = getattr(app.state, "warm_start", None)
        if warm is not None:
            app.state.readiness.begin(())  # not ready from the first request on; warm_start names the models
        warming = asyncio.create_task(warm(app)) if warm is not None else None
        cluster: Cluster = app.state.cluster
        try:
            await cluster.start()
            yield
        finally:
            if warming is not None:
                warming.cancel()
                await asyncio.gather(warming, return_exceptions=True)
            # Each step is bounded and an overrun is logged by name: a drained node must exit (a CI
            # run once saw one hang here for over 20 s, step unknown).
            for name, step in (("calls", app.state.calls.close), ("cluster", cluster.stop),
                               ("state", state.close), ("llm", llm.close), ("speech", speech.close)):
                try:
                    await asyncio.wait_for(step(), _SHUTDOWN_STEP_S)
                except TimeoutError:
                    log.warning("Shutdown: closing %s took over %.0f s; going on", name, _SHUTDOWN_STEP_S)

    docs = settings.api_docs  # off by default: the schema is served without a key
    app = FastAPI(title="openrealtime", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.settings = settings
    app.state.keys = KeyChecker(settings.api_keys)
    app.state.llm = llm
    app.state.speech = speech
    app.state.engine = ctx
    app.state.calls = CallManager(settings, ctx)
    app.state.admission = Admission(  # WebSocket sessions + WebRTC calls on this node
        settings.max_sessions,
        max_queue_wait_s=None if settings.max_queue_wait_ms is None else settings.max_queue_wait_ms / 1000)
    app.state.readiness = Readiness()  # the warm start's progress, for /readyz
    app.state.state = state
    app.state.cluster = Cluster(settings, state, app.state.admission, app.state.calls)
    app.state.client_secrets = ClientSecrets(state.secrets, ttl_s=settings.client_secret_ttl_s)
    install_error_handlers(app)
    if settings.cors_origins:
        # Browser apps on other origins: SDKs add headers of their own (X-OpenAI-Agents-SDK,
        # OpenAI-Beta, X-Stainless-*), so a preflight may ask for any header. Keys travel as bearer
        # tokens, never cookies, so no credentials mode is needed. The playground's own routes keep
        # their same-origin check (playground.py).
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["Location"], max_age=600)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness for load balancers (no key, like /healthz): 503 while models load or the server drains."""
        return readiness_response(app.state.admission, app.state.readiness)

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
    app.include_router(metrics_router)
    install_playground(app, settings)
    return app
