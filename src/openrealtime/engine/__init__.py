"""The transport-agnostic session state machine."""

from .context import EngineContext
from .session import InvalidSessionConfig, RealtimeSession

__all__ = ["EngineContext", "InvalidSessionConfig", "RealtimeSession"]
