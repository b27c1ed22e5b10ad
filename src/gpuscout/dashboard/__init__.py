"""The dashboard: static files served at "/" (vanilla JS, no build step).

``static/vendor/`` holds the chart library (uPlot), which the Makefile
installs from npm and copies there (``make install``, ``make run``); it is
not in git. The page reads the REST API and follows ``GET /api/v1/stream``
(api/routes/live.py).
"""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"

__all__ = ["STATIC_DIR"]
