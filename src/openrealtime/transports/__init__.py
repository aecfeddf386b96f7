"""Adapters from a connection (WebRTC peer, WebSocket) to a RealtimeSession."""
