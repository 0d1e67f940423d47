"""imageworks-proxy: one OpenAI-compatible base URL in front of the model servers on a GPU box."""

__version__ = "0.1.0"

from imageworks_proxy.app import create_app

__all__ = ["__version__", "create_app"]
