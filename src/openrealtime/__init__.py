"""openrealtime: a self-hostable server for the OpenAI Realtime API."""

__version__ = "0.1.0"
