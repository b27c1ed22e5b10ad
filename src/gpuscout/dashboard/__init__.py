"""The dashboard: static files (vanilla JS, no build step) served at "/"."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"

__all__ = ["STATIC_DIR"]
