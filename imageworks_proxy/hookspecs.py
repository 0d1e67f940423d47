"""The plugin hooks of imageworks-proxy (pluggy project ``imageworks_proxy``).

Hooks are registration hooks: they run once per app while it is built, synchronously, and hand the
plugin a ``register`` callback. The real work happens in the registered objects (async adapter methods,
stage methods), never in hook calls on the request path. A hook implementation's return value is ignored
(``None`` is the normal return).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

PROJECT = "imageworks_proxy"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[[type], None]) -> None:
    """Register backend adapter classes.

    Runs once per app while it is built. Call ``register(AdapterClass)`` for each adapter; the class must
    subclass :class:`imageworks_proxy.adapters.base.Adapter` and set a unique ``name`` and the registry
    ``backends`` it claims. Two plugins registering the same adapter name is a startup error naming both.
    """


@hookspec
def register_stages(register: Callable[[type], None]) -> None:
    """Register chat pipeline stage classes.

    Runs once per app while it is built. Call ``register(StageClass)`` for each stage; the class must
    subclass :class:`imageworks_proxy.pipeline.stage.Stage` with a unique ``name`` and an ``order`` (the
    built-in stages use 100-1100 in steps of 100; pick a number between them to run in between).
    """


@hookspec
def startup(app: web.Application) -> None:
    """Called once per app after the built-in routes and resources are set up, before the app is frozen.

    A plugin may add routes, middlewares or ``cleanup_ctx`` entries here, or read
    ``imageworks_proxy.keys.config(app)``. Return ``None``.
    """


HOOKSPECS: tuple[Any, ...] = (register_backends, register_stages, startup)
