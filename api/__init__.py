"""The HTTP API (FastAPI): routes, the error shape, downloads, server-sent events."""
