"""The REST API (FastAPI): ``create_app(service)`` serves /api/v1, the user
proxy, /healthz, /metrics and the dashboard."""

from gpuscout.api.app import API_PREFIX, create_app

__all__ = ["API_PREFIX", "create_app"]
