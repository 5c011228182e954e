"""slime_router_client: a Python client of slime-router (``pip install 'slime-router[client]'``).

Sessions, generation, exact trajectories and batch retrieval over HTTP (httpx); numpy is optional and imported
only when ``numpy=True`` is asked for. See docs/client.md.

- ``Client`` / ``AsyncClient``: one router (``base_url``, ``api_key``); ``session()``, ``get_session()``,
  ``list_sessions()``, ``retrieve_batch()``, ``retrieve_text()``, ``retrieve_messages()``.
- ``Session`` / ``AsyncSession``: ``generate()``, ``chat()``, ``openai()``, ``set_metadata()``, ``data()``,
  ``trajectories()``, ``finish()``, ``finish_data()``.
- ``Trajectory``, ``Turn``, ``SessionData``: what comes back.
- ``SlimeRouterError`` (``SessionFinished``, ``SessionNotFound``): error answers.
"""

from ._async import AsyncClient, AsyncGenerateStream, AsyncSession, SessionOpener
from ._sync import Client, GenerateStream, Session
from .errors import SessionFinished, SessionNotFound, SlimeRouterError
from .types import SessionData, Trajectory, TrajectoryReason, Turn

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncSession",
    "Client",
    "GenerateStream",
    "Session",
    "SessionData",
    "SessionFinished",
    "SessionNotFound",
    "SessionOpener",
    "SlimeRouterError",
    "Trajectory",
    "TrajectoryReason",
    "Turn",
]
