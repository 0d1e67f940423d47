"""Vision preprocessing: inline images for vision models are downscaled before they reach the backend.

A vision model served by vLLM turns every image into tokens by its pixel count; a phone photo can take
more of a small context window than the whole conversation. So ``data:`` images for vision entries on the
backends in ``CHAT_PROXY_VISION_DOWNSCALE_BACKENDS`` (vLLM by default) are shrunk to the entry's target
long edge (docs/api.md, "Images and vision models"). The pixel work runs in a worker thread, once per
distinct image; the request log records what was resized.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imageworks_proxy import keys
from imageworks_proxy.pipeline.stage import ChatContext, Stage
from imageworks_proxy.wire.content import (
    DataUrl,
    data_url,
    image_parts,
    image_url_of,
    parse_data_url,
    with_image_url,
)
from imageworks_proxy.wire.imaging import Downscaled, downscale

if TYPE_CHECKING:
    from imageworks_proxy.catalogue.registry import Entry

log = logging.getLogger("imageworks_proxy.vision")


def _edge(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and value > 0 else None


def target_long_edge(entry: Entry, default: int) -> int:
    """The long edge, in pixels, that images for ``entry`` are shrunk to:
    ``metadata.vision_target_long_edge``, else ``metadata.vision.target_long_edge``, else
    ``target_long_edge`` in the ``capabilities`` object's ``vision`` value (as ImageWorks writes it), else
    ``default``. A value that is not a positive whole number is logged and ignored."""
    meta = entry.metadata
    capabilities = entry.raw.get("capabilities")
    candidates = [
        ("metadata.vision_target_long_edge", meta.get("vision_target_long_edge")),
        ("metadata.vision.target_long_edge", _get(meta.get("vision"), "target_long_edge")),
        ("capabilities.vision.target_long_edge", _get(_get(capabilities, "vision"), "target_long_edge")),
    ]
    for where, value in candidates:
        if value is None:
            continue
        edge = _edge(value)
        if edge is not None:
            return edge
        log.warning("model %s: %s=%r is not a number of pixels; using %d", entry.name, where, value, default)
    return default


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else None


def _downscale_all(images: dict[str, DataUrl], long_edge: int) -> dict[str, tuple[Downscaled, int]]:
    """Each distinct image downscaled (blocking: runs in a worker thread), with its decoded size."""
    out = {}
    for url, data in images.items():
        raw = data.decode()
        out[url] = (downscale(raw, long_edge), len(raw))
    return out


class VisionDownscale(Stage):
    """Shrinks inline images for vision entries on the configured backends to their target long edge."""

    name = "vision-downscale"
    order = 550  # after the image limits (400) and history truncation (500): only kept images are resized

    def _applies(self, entry: Entry) -> bool:
        backends = self.config.vision_downscale_backends
        if "*" in backends or entry.backend in backends:
            return True
        return keys.models(self.app).adapter_for(entry).name in backends

    async def request(self, ctx: ChatContext) -> None:
        entry = ctx.entry
        if not (self.config.vision_downscale and ctx.images and entry is not None and ctx.can("vision")):
            return
        if not self._applies(entry):
            return
        parts = []
        images: dict[str, DataUrl] = {}
        for msg, i, part in image_parts(ctx.body["messages"]):
            url = image_url_of(part)
            data = parse_data_url(url) if url else None
            if data is not None:
                parts.append((msg, i, part, url))
                images.setdefault(url, data)
        if not images:
            return
        edge = target_long_edge(entry, self.config.vision_target_long_edge)
        results = await asyncio.to_thread(_downscale_all, images, edge)
        resized: dict[str, str] = {}
        for url, (result, size) in results.items():
            if result.data is None or result.mime is None:
                continue
            resized[url] = data_url(result.mime, result.data)
            ctx.images_resized = ctx.images_resized or []
            ctx.images_resized.append(
                {"from": list(result.before), "to": list(result.after),
                 "bytes_before": size, "bytes_after": len(result.data)}
            )
        for msg, i, part, url in parts:
            if url in resized:
                msg["content"][i] = with_image_url(part, resized[url])
