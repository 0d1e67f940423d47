"""Image limits on the request: non-vision placeholders, the decoded-size limit, base64 checks.

Both image part kinds (``image_url`` and ``input_image``) go through the same rules, through the helpers
of :mod:`imageworks_proxy.wire.content`.
"""

from __future__ import annotations

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.pipeline.stage import ChatContext, Stage
from imageworks_proxy.wire.content import (
    alt_text_of,
    image_parts,
    image_url_of,
    is_base64,
    is_remote,
    parse_data_url,
)

PLACEHOLDER = "[image omitted: model does not support images]"


class ImageLimits(Stage):
    """Non-vision models get a text placeholder (409 when an image has no alt text); images over
    ``CHAT_PROXY_MAX_IMAGE_BYTES`` are 413; undecodable base64 is 400."""

    name = "images"
    order = 400

    async def request(self, ctx: ChatContext) -> None:
        parts = list(image_parts(ctx.body["messages"]))
        ctx.images = len(parts)
        if not parts:
            return
        entry = ctx.entry
        if entry is not None and not ctx.can("vision"):
            missing = [p for _, _, p in parts if alt_text_of(p) is None]
            if missing:
                raise ProxyError(
                    409,
                    "capability_mismatch",
                    f"Model {ctx.model!r} does not support images and {len(missing)} image(s) have no alt "
                    "text. Pick a vision model or remove the images.",
                    param="messages",
                )
            for msg, i, part in parts:
                msg["content"][i] = {"type": "text", "text": f"{PLACEHOLDER} (alt: {alt_text_of(part)})"}
            return
        for _, _, part in parts:
            self._check(part)

    def _check(self, part: dict) -> None:
        url = image_url_of(part)
        if not url:
            raise ProxyError(400, "invalid_image", "An image part has no url.", param="messages")
        if is_remote(url):
            return
        data = parse_data_url(url)
        if data is None:
            raise ProxyError(
                400, "invalid_image", "Image URLs must be data: URLs or http(s) URLs.", param="messages"
            )
        limit = self.config.max_image_bytes
        if data.size > limit:
            raise ProxyError(
                413,
                "payload_too_large",
                f"An image is {data.size} bytes decoded; the limit is {limit} bytes "
                "(CHAT_PROXY_MAX_IMAGE_BYTES).",
                param="messages",
            )
        if not is_base64(data.payload):
            raise ProxyError(
                400, "invalid_image", "An image's base64 data cannot be decoded.", param="messages"
            )
