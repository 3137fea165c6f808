"""hub: a real-time live-session WebSocket hub."""

__version__ = "0.1.0"
