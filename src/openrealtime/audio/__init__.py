"""Audio helpers: codecs and buffers (pure functions, no I/O)."""
