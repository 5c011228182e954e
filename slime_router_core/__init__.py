"""slime-router core: the plugin framework, the worker pool and the /generate proxy."""

from .context import RequestContext
from .errors import HTTPError, PluginLoadError
from .hookspecs import hookimpl
from .registry import ComponentRegistry
from .settings import OptionRegistry, Settings

__all__ = ["hookimpl", "HTTPError", "PluginLoadError", "RequestContext", "ComponentRegistry", "OptionRegistry",
           "Settings"]
