"""HTTP and WebSocket surface: FastAPI app factory, routes, auth, error shapes."""
