"""Embed imageworks-proxy in your own aiohttp application.

The proxy is mounted under ``/llm``: your app keeps its own routes, and the proxy's OpenAI API is at
``http://127.0.0.1:8080/llm/v1`` (``/llm/v1/models``, ``/llm/v1/chat/completions``, ``/llm/v1/health``).
Its resources (HTTP client session, adapters, registry watcher) start and stop with your app.

Run it from the repository root::

    CHAT_PROXY_REGISTRY=examples/registry.json python examples/embed_app.py
"""

from __future__ import annotations

from aiohttp import web

from imageworks_proxy import Config, create_app, load_config


async def index(request: web.Request) -> web.Response:
    return web.json_response({"app": "my-app", "llm_base_url": str(request.url.with_path("/llm/v1"))})


def build_app(config: Config | None = None) -> web.Application:
    """Your application with the proxy mounted at ``/llm``."""
    config = config if config is not None else load_config()
    # The request body cap is the *parent's* setting in aiohttp (requests are created by the app that
    # owns the server), so give the parent the proxy's cap or image chats over 1 MiB are refused.
    parent = web.Application(client_max_size=config.max_body_bytes)
    parent.router.add_get("/", index)
    parent.add_subapp("/llm", create_app(config))
    return parent


if __name__ == "__main__":
    web.run_app(build_app(), host="127.0.0.1", port=8080)
