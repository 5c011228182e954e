"""metrics plugin: ``GET /metrics`` (the seed guide's JSON) and Prometheus exposition for scrapers.

See :mod:`slime_router_plugins.metrics.plugin` for the routes and options, and
:mod:`slime_router_plugins.metrics.collector` for every metric name. ``grafana_dashboard.json``
next to this file is a ready dashboard for the Prometheus metrics.
"""

from .collector import MetricsState, RouterCollector

__all__ = ["MetricsState", "RouterCollector", "dashboard_path"]


def dashboard_path() -> str:
    """Path of the bundled Grafana dashboard JSON."""
    from pathlib import Path

    return str(Path(__file__).with_name("grafana_dashboard.json"))
