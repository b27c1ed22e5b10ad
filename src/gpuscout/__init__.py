"""GPU Scout: keeps ML training jobs on the cheapest capacity that is really available."""

__version__ = "0.1.0"
