"""The model routes of the fake Ollama (:mod:`imageworks_proxy.testing.fakes.ollama`): ``/api/tags``,
``/api/show``, ``/api/ps`` and ``/api/version``, answered from the fake's state (``models``,
``list_capabilities``, ``shows``, ``loaded_now()``)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


def _details(tag: str) -> dict[str, Any]:
    return {"format": "gguf", "family": tag.split(":")[0], "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M"}


class ModelRoutes:
    """Mixed into ``FakeOllama``."""

    models: dict[str, tuple[str, ...]]
    list_capabilities: bool
    shows: list[str]
    show_delay_s: float
    shows_in_flight: int
    most_shows_at_once: int

    def _resolve(self, name: Any) -> str | None:
        raise NotImplementedError

    def loaded_now(self) -> list[str]:
        raise NotImplementedError

    async def tags(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": tag,
                "model": tag,
                "modified_at": "2026-01-01T00:00:00Z",
                "size": 2_000_000_000,
                "digest": "sha256:" + "0" * 64,
                "details": _details(tag),
                **({"capabilities": list(caps)} if self.list_capabilities else {}),
            }
            for tag, caps in self.models.items()
        ]
        return web.json_response({"models": models})

    async def show(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("model") or body.get("name")
        tag = self._resolve(name)
        self.shows.append(str(name))
        self.shows_in_flight += 1
        self.most_shows_at_once = max(self.most_shows_at_once, self.shows_in_flight)
        try:
            await asyncio.sleep(self.show_delay_s)
        finally:
            self.shows_in_flight -= 1
        if tag is None:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response(
            {
                "modelfile": f"FROM {tag}",
                "template": "{{ .Prompt }}",
                "details": _details(tag),
                "model_info": {"general.architecture": tag.split(":")[0]},
                "capabilities": list(self.models[tag]),
                "modified_at": "2026-01-01T00:00:00Z",
            }
        )

    async def ps(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": tag,
                "model": tag,
                "size": 3_000_000_000,
                "size_vram": 3_000_000_000,
                "digest": "sha256:" + "0" * 64,
                "expires_at": "2026-01-05T10:05:00Z",
                "context_length": 4096,
            }
            for tag in self.loaded_now()
        ]
        return web.json_response({"models": models})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.33.0"})
