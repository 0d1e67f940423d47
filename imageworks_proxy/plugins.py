"""The plugin manager factory and what the loaded plugins registered (docs/plugins.md)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import attrs
import pluggy

from imageworks_proxy import hookspecs

log = logging.getLogger("imageworks_proxy.plugins")

OWN_DISTRIBUTION = "imageworks-proxy"


def builtin_adapters() -> dict[str, str]:
    """The built-in adapter plugins, entry-point name -> module: this distribution's own entry points
    (``pyproject.toml`` is the one list). Read from its metadata alone, so a manager built without
    scanning every installed distribution (tests) still has them. Raises :class:`PluginError` when the
    package is not installed (run ``pip install -e .``)."""
    try:
        eps = md.distribution(OWN_DISTRIBUTION).entry_points
    except md.PackageNotFoundError:
        raise PluginError(
            f"{OWN_DISTRIBUTION} is not installed, so its built-in adapters cannot be found "
            "(run `pip install -e .` in the checkout)"
        ) from None
    return {ep.name: ep.value for ep in eps if ep.group == hookspecs.PROJECT}


#: Core plugins registered directly (the shared pipeline stages).
CORE_PLUGINS: tuple[str, ...] = ("imageworks_proxy.pipeline.builtin",)


class PluginError(RuntimeError):
    """Plugins registered something the proxy cannot use (e.g. two adapters with one name)."""


@attrs.frozen
class PluginFailure:
    name: str
    error: str


@attrs.frozen
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what we learned while loading (failures, distribution versions)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.failures: list[PluginFailure] = []
        self.infos: dict[str, PluginInfo] = {}


def make_plugin_manager(
    *, load_entrypoints: bool = True, plugins: Iterable[ModuleType | Any] = ()
) -> PluginManager:
    """Build the plugin manager: hookspecs, core plugins, adapters from entry points, then ``plugins``.

    ``load_entrypoints=False`` skips entry-point scanning (tests); the built-in adapters are then
    registered from :func:`builtin_adapters` directly. A plugin that fails to import is recorded in
    ``failures`` and logged with its name; the others still load.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    builtins = builtin_adapters()
    own_version = md.version(OWN_DISTRIBUTION)
    for modname in CORE_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        pm.infos[modname] = PluginInfo(modname, OWN_DISTRIBUTION, own_version, True)
    if load_entrypoints:
        for ep in md.entry_points(group=hookspecs.PROJECT):
            dist = getattr(ep, "dist", None)
            if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                first = pm.infos.get(ep.name)
                theirs = dist.name if dist else None
                if first is not None and first.distribution != theirs:
                    # Two distributions chose one entry-point name: say so rather than drop one silently.
                    _fail(
                        pm,
                        f"{ep.name} ({theirs or '?'})",
                        PluginError(
                            f"entry point name {ep.name!r} is already used by "
                            f"{first.distribution or '?'}; skipped"
                        ),
                    )
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any error in third-party code
                _fail(pm, ep.name, exc)
                continue
            _register(pm, ep.name, plugin, dist.name if dist else None, dist.version if dist else None)
    for name, modname in builtins.items():
        if not pm.has_plugin(name):
            _register(pm, name, importlib.import_module(modname), OWN_DISTRIBUTION, own_version, builtin=True)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        _register(pm, name, plugin, None, None)
    pm.check_pending()
    return pm


def _register(
    pm: PluginManager, name: str, plugin: Any, dist: str | None, version: str | None, *, builtin: bool = False
) -> None:
    try:
        pm.register(plugin, name=name)
    except Exception as exc:  # pluggy validation errors: unknown hook, bad signature
        _fail(pm, name, exc)
        return
    pm.infos[name] = PluginInfo(name, dist, version, builtin or dist == OWN_DISTRIBUTION)


def _fail(
    pm: PluginManager, name: str, exc: BaseException, when: str = "failed to load and is disabled"
) -> None:
    msg = f"{type(exc).__name__}: {exc}"
    pm.failures.append(PluginFailure(name, msg))
    log.error("plugin %r %s: %s", name, when, msg)


def call_each(pm: PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of a (non-registration) hook, in pluggy's order.

    An implementation that raises is recorded in ``failures`` under its plugin's name and logged; the
    others still run, so one broken plugin never stops the app from starting.
    """
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        try:
            impl.function(*(kwargs[arg] for arg in impl.argnames))
        except Exception as exc:
            _fail(pm, pm.get_name(impl.plugin) or repr(impl.plugin), exc, f"failed in hook {hook_name}")


def collect(pm: PluginManager, hook_name: str) -> list[tuple[str, type]]:
    """Call a registration hook and return (plugin name, registered class) pairs, in registration order."""
    out: list[tuple[str, type]] = []
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        registered: list[type] = []
        try:
            impl.function(register=registered.append)
        except Exception as exc:
            _fail(pm, plugin_name, exc, f"failed in hook {hook_name}")
            continue
        out.extend((plugin_name, cls) for cls in registered)
    return out


def unique_by_name(pairs: list[tuple[str, type]], what: str) -> dict[str, tuple[str, type]]:
    """Index registered classes by their ``name``; a clash is a startup error naming both plugins."""
    out: dict[str, tuple[str, type]] = {}
    for plugin_name, cls in pairs:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin_name!r} registered a {what} without a name: {cls!r}")
        if name in out:
            raise PluginError(
                f"{what} {name!r} is registered by both plugin {out[name][0]!r} and plugin {plugin_name!r}"
            )
        out[name] = (plugin_name, cls)
    return out
