"""Maps the ``model`` a session asks for to a loaded local LLM.

Clients written for OpenAI send names like ``gpt-realtime``; those (and anything else we do not
know) mean "the server's default model", so unmodified clients just work. Known registry names pick
that model, and ``.gguf`` paths are accepted only when the operator allows it.

Models load lazily, in a thread, once: concurrent sessions asking for the same model share one
load and one backend. At most ``max_loaded`` models stay in memory; when another is needed, the
least recently used idle one is closed. Sessions get a handle rather than the backend itself, so
an evicted model is simply loaded again on its next use instead of failing the session.

Remote models: ``<provider>/<model>`` names a model of a configured OpenAI-compatible provider
(``settings.providers``); the session then streams from that server through ``OpenAICompatLLM``.
Nothing is loaded for them, and one HTTP connection pool per provider is shared by its models.
A ``<name>/...`` whose ``<name>`` is not a configured provider is an error (``model_not_found``),
not a silent fallback to the local model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from openrealtime.backends.gguf import (
    ensure_model,
    get_known_model,
    is_installed,
    is_model_path,
    known_models,
)
from openrealtime.backends.llm import ChatMessage, GenerationParams, LLMBackend, LLMError, LLMEvent, ToolSpec
from openrealtime.config import Settings
from openrealtime.protocol.session import OPENAI_REALTIME_MODEL

logger = logging.getLogger(__name__)

BackendFactory = Callable[..., LLMBackend]


def _default_factory(path: Path, *, n_ctx: int, n_threads: int, name: str, n_parallel: int = 16,
                     cache_tokens: int = 0) -> LLMBackend:
    from openrealtime.backends.llamacpp import LlamaCppBackend  # loads libllama only when needed

    return LlamaCppBackend(path, n_ctx=n_ctx, n_threads=n_threads, name=name, n_parallel=n_parallel,
                           cache_tokens=cache_tokens)


class _Slot:
    """A loaded (or loading) model file and its bookkeeping."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.backend: LLMBackend | None = None
        # The load in progress; a task of its own so a cancelled waiter cannot orphan a loaded model.
        self.loading: asyncio.Task[None] | None = None
        self.active = 0
        self.last_used = time.monotonic()


class ModelHandle:
    """What sessions hold: an ``LLMBackend`` that (re)loads its model through the registry on use."""

    def __init__(self, registry: LLMRegistry, ref: str, allow_paths: bool, name: str) -> None:
        self._registry = registry
        self._ref = ref
        self._allow_paths = allow_paths
        self.name = name
        self.context_length = 0
        self.prefills = False  # as the loaded backend (see engine/prefill.py), known once it loaded

    async def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator[LLMEvent]:
        """Delegate to the loaded backend, marking the model busy so it is not evicted meanwhile."""
        slot = await self._registry._acquire(self)
        try:
            assert slot.backend is not None
            inner = slot.backend.stream(messages, params)
            try:
                async for event in inner:
                    yield event
            finally:
                # Close the inner generator now (not at GC) so the model stops generating promptly.
                aclose = getattr(inner, "aclose", None)
                if aclose is not None:
                    await aclose()
        finally:
            self._registry._release(slot)

    async def count_tokens(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> int:
        """Prompt size under this model's tokenizer and chat template."""
        slot = await self._registry._acquire(self)
        try:
            assert slot.backend is not None
            return await slot.backend.count_tokens(messages, tools)
        finally:
            self._registry._release(slot)

    async def close(self) -> None:
        """Sessions do not own the model: the registry closes it (on eviction or shutdown)."""

    def __repr__(self) -> str:
        return f"ModelHandle({self.name!r})"


class LLMRegistry:
    """Resolves session model names to shared, lazily loaded local LLM backends."""

    def __init__(self, settings: Settings, *, max_loaded: int = 2, factory: BackendFactory | None = None):
        self._settings = settings
        self._max_loaded = max(1, max_loaded)
        self._factory = factory or _default_factory
        self._handles: dict[str, ModelHandle] = {}
        self._slots: dict[str, _Slot] = {}  # by resolved file path
        self._refs: dict[str, str] = {}  # model reference -> resolved file path key
        self._ref_locks: dict[str, asyncio.Lock] = {}
        self._created = int(time.time())
        self._closed = False
        self._provider_clients: dict[str, Any] = {}  # provider name -> httpx.AsyncClient

    # --- naming ---

    def _reference(self, model: str | None) -> tuple[str, bool]:
        """Canonical model reference and whether it may be a path (always, for the server default)."""
        requested = (model or "").strip()
        if requested and is_model_path(requested):
            if not self._settings.allow_model_paths:
                raise LLMError(
                    "Choosing a model file by path is disabled on this server.", code="model_not_allowed"
                )
            return os.path.abspath(os.path.expanduser(requested)), True
        if requested:
            known = get_known_model(requested)
            if known is not None:
                return known.name, False
            if self._settings.strict_names and not OPENAI_REALTIME_MODEL.match(requested) \
                    and requested != self._settings.llm_model.strip():
                raise LLMError(f"Unknown model '{requested}'. This server has: "
                               f"{', '.join(m['id'] for m in self.available_models())}.",
                               code="model_not_found", details={"model": requested})
            logger.debug("Model %r is not a local model; using the default %r", requested,
                         self._settings.llm_model)
        default = self._settings.llm_model.strip()
        known = get_known_model(default)
        if known is not None:
            return known.name, False
        return (os.path.abspath(os.path.expanduser(default)) if is_model_path(default) else default), True

    @property
    def default_model(self) -> str:
        """What sessions get when they name no local model (e.g. ``gpt-realtime``)."""
        return self._reference(None)[0]

    # --- public API ---

    def remote_route(self, model: str | None) -> tuple[str, str] | None:
        """``(provider, model)`` when ``model`` (or, for names we do not know, the server default)
        is served by a configured provider; None for local models. Raises LLMError(model_not_found)
        for ``<name>/<model>`` with an unconfigured ``<name>``."""
        requested = (model or "").strip()
        if requested and (is_model_path(requested) or get_known_model(requested) is not None):
            return None
        default = self._settings.llm_model.strip()
        for ref in (requested, default):
            if not ref or "/" not in ref or is_model_path(ref):
                continue
            provider, _, name = ref.partition("/")
            if provider in self._settings.providers and name:
                return provider, name
            if ref is requested and ref != default and not self._settings.strict_names:
                continue  # a hosted service's name (e.g. openai/gpt-4o-mini): the default model serves it
            configured = ", ".join(sorted(self._settings.providers)) or "none"
            raise LLMError(
                f"Unknown model '{ref}': '{provider}' is not a configured provider (configured: {configured}). "
                "Use '<provider>/<model>' with a provider from the server config, or a local model name.",
                code="model_not_found", details={"model": ref},
            )
        return None

    def effective(self, model: str | None) -> str:
        """The model that really serves a session asking for ``model`` (what session.updated shows)."""
        route = self.remote_route(model)
        if route is not None:
            return "/".join(route)
        return self._reference(model)[0]

    def validate(self, model: str | None) -> str | None:
        """Why a session cannot use ``model`` (an error message), or None if it can. Cheap: loads nothing."""
        try:
            if self.remote_route(model) is None:
                self._reference(model)
        except LLMError as exc:
            return str(exc)
        return None

    def _provider_client(self, provider: str) -> Any:
        """The provider's shared HTTP client, created on first use (inside the serving event loop)."""
        client = self._provider_clients.get(provider)
        if client is None:
            import httpx

            cfg = self._settings.providers[provider]
            client = self._provider_clients[provider] = httpx.AsyncClient(
                timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s))
        return client

    def _remote_backend(self, provider: str, model: str) -> LLMBackend:
        from openrealtime.backends.openai_llm import OpenAICompatLLM

        cfg = self._settings.providers[provider]
        return OpenAICompatLLM(
            cfg.base_url, cfg.key(), model, timeout=cfg.timeout_s, connect_timeout=cfg.connect_timeout_s,
            connect_retries=cfg.connect_retries, context_length=cfg.context_length, name=f"{provider}/{model}",
            headers=cfg.headers, stream_usage=cfg.stream_usage,
            client=lambda: self._provider_client(provider), accepts_images=cfg.vision,
        )

    def accepts_images(self, model: str | None) -> bool:
        """Whether the model serving a session's ``model`` reads images. Cheap: loads nothing.

        Local GGUF models are text-only; a provider's models read them when it is configured
        ``vision = true``.
        """
        route = self.remote_route(model)
        return route is not None and self._settings.providers[route[0]].vision

    async def resolve(self, model: str | None) -> LLMBackend:
        """The backend for a session's ``model`` field, loading it on first use (off the loop)."""
        if self._closed:
            raise LLMError("The server is shutting down", code="model_closed")
        route = self.remote_route(model)
        if route is not None:
            return self._remote_backend(*route)  # cheap; errors surface when it streams
        ref, allow_paths = self._reference(model)
        handle = self._handles.get(ref)
        if handle is None:
            handle = self._handles[ref] = ModelHandle(self, ref, allow_paths, name=ref)
        slot = await self._acquire(handle)  # load now, so errors surface at resolve time
        self._release(slot)
        return handle

    def available_models(self) -> list[dict[str, Any]]:
        """OpenAI ``/v1/models`` entries: installed registry models, plus whatever is loaded."""
        names: list[str] = []
        default = self.default_model
        for m in known_models():
            if m.name == default or is_installed(m):
                names.append(m.name)
        for ref in self._refs:
            if ref not in names:
                names.append(ref)
        if default not in names:
            names.insert(0, default)
        for provider, cfg in self._settings.providers.items():
            for remote in cfg.models:
                if f"{provider}/{remote}" not in names:
                    names.append(f"{provider}/{remote}")
        return [
            {"id": name, "object": "model", "created": self._created, "owned_by": "openrealtime"}
            for name in names
        ]

    def loaded_models(self) -> list[str]:
        """Model files currently in memory (for diagnostics and tests)."""
        return [key for key, slot in self._slots.items() if slot.backend is not None]

    async def close(self) -> None:
        """Free every model (server shutdown)."""
        self._closed = True
        for client in list(self._provider_clients.values()):
            with contextlib.suppress(Exception):
                await client.aclose()
        self._provider_clients.clear()
        for slot in list(self._slots.values()):
            if slot.loading is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(slot.loading)  # it sees _closed and frees what it loaded
            backend, slot.backend = slot.backend, None
            if backend is not None:
                await backend.close()
        self._slots.clear()

    # --- loading / eviction ---

    async def _acquire(self, handle: ModelHandle) -> _Slot:
        """Return the slot of a loaded backend for ``handle``, marked busy until ``_release``."""
        if self._closed:
            raise LLMError("The server is shutting down", code="model_closed")
        ref = handle._ref
        ref_lock = self._ref_locks.setdefault(ref, asyncio.Lock())
        async with ref_lock:  # one ensure_model per reference at a time (assembly can take seconds)
            key = self._refs.get(ref)
            if key is None:
                key = self._refs[ref] = await asyncio.to_thread(self._prepare, ref, handle._allow_paths)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key)
        slot.active += 1
        slot.last_used = time.monotonic()
        try:
            while slot.backend is None:  # concurrent users of the same file share one load
                if slot.loading is None:
                    slot.loading = asyncio.create_task(self._load(slot, handle.name))
                    # Waiters may all be cancelled; the failure is reported to the next one anyway.
                    slot.loading.add_done_callback(lambda t: t.cancelled() or t.exception())
                await asyncio.shield(slot.loading)
            handle.context_length = slot.backend.context_length
            handle.prefills = bool(getattr(slot.backend, "prefills", False))
        except BaseException:
            slot.active -= 1
            raise
        return slot

    async def _load(self, slot: _Slot, name: str) -> None:
        try:
            if self._closed:
                raise LLMError("The server is shutting down", code="model_closed")
            await self._evict(keep=slot)
            logger.info("Loading model %s from %s", name, slot.key)
            backend = await asyncio.to_thread(
                self._factory, Path(slot.key), n_ctx=self._settings.llm_context,
                n_threads=self._settings.llm_threads, name=name, n_parallel=self._settings.llm_parallel,
                cache_tokens=self._settings.llm_cache_tokens,
            )
            if self._closed:  # shut down while loading
                await backend.close()
                raise LLMError("The server is shutting down", code="model_closed")
            slot.backend = backend
        finally:
            slot.loading = None

    def _prepare(self, ref: str, allow_paths: bool) -> str:
        """Blocking: make the model file exist (may assemble/verify ~1 GB) and return its real path."""
        path = ensure_model(ref, self._settings.model_cache_dir, allow_paths=allow_paths,
                            progress=sys.stderr.isatty())
        return str(Path(path).resolve())

    def _release(self, slot: _Slot) -> None:
        slot.active -= 1
        slot.last_used = time.monotonic()

    async def _evict(self, keep: _Slot) -> None:
        """Close least recently used idle models until a new one fits under ``max_loaded``."""
        while True:
            loaded = [s for s in self._slots.values() if s.backend is not None and s is not keep]
            if len(loaded) < self._max_loaded:
                return
            idle = [s for s in loaded if s.active == 0 and s.loading is None]
            if not idle:
                logger.warning("All %d loaded models are busy; loading one more", len(loaded))
                return
            victim = min(idle, key=lambda s: s.last_used)
            backend, victim.backend = victim.backend, None
            logger.info("Unloading least recently used model %s", victim.key)
            assert backend is not None
            await backend.close()
