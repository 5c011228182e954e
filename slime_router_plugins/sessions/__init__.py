"""sessions plugin: trajectories keyed by a session id (``X-Session-ID`` or a ``/sessions/{sid}/`` base URL),
retrieved whole by the trainer (``GET /sessions/{sid}``, ``POST /retrieve_batch``). See ``plugin.py`` for the
hooks and routes and ``store.py`` for how turns become trajectories."""

from .store import Segment, Session, SessionGone, SessionStore

__all__ = ["Segment", "Session", "SessionGone", "SessionStore"]
