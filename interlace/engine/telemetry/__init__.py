"""Telemetry: the result envelope (provenance of every measurement), timers, accounting."""

from .envelope import envelope, format_envelope

__all__ = ["envelope", "format_envelope"]
