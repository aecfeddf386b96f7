"""Pydantic models of the wire protocol: session config, items, client and server events. No I/O."""
