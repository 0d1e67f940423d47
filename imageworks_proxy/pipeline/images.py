"""Image handling on the request: non-vision placeholders, decoded-size limit, base64 checks (SPEC §6.4)."""

from __future__ import annotations

import binascii
from collections.abc import Iterator
from typing import Any

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.pipeline.stage import ChatContext, Stage

PLACEHOLDER = "[image omitted: model does not support images]"


def image_url_of(part: dict[str, Any]) -> str | None:
    """The URL of an ``image_url`` content part (object or bare-string form)."""
    ref = part.get("image_url")
    if isinstance(ref, dict):
        url = ref.get("url")
    else:
        url = ref
    return url if isinstance(url, str) else None


def alt_text_of(part: dict[str, Any]) -> str | None:
    ref = part.get("image_url")
    for holder in (part, ref if isinstance(ref, dict) else {}):
        for key in ("alt", "alt_text", "detail_text"):
            value = holder.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def image_parts(messages: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], int, dict[str, Any]]]:
    """(message, part index, part) for every ``image_url`` part."""
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            for i, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    yield msg, i, part


def split_data_url(url: str) -> tuple[str, str] | None:
    """``data:<mime>;base64,<payload>`` → (mime, payload); ``None`` for other URLs."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ProxyError(
            400,
            "invalid_image",
            "Image data URLs must be base64 encoded (data:<type>;base64,...).",
            param="messages",
        )
    return head[5:-7] or "application/octet-stream", payload


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def is_base64(payload: str) -> bool:
    """Well-formed base64 (line breaks tolerated), checked without decoding: a multi-megabyte image costs
    a few C-speed passes instead of a full decode on the event loop."""
    if not payload.isascii():
        return False
    data = payload.encode("ascii")
    if any(c in data for c in b" \n\r\t"):
        data = b"".join(data.split())
    body = data.rstrip(b"=")
    if len(data) % 4 or len(data) - len(body) > 2 or not body:
        return False
    if body.translate(None, _B64_ALPHABET):
        return False
    try:  # the last quantum decides whether the padding bits are valid; decode just that
        binascii.a2b_base64(data[-8:] if len(data) >= 8 else data, strict_mode=True)
    except (binascii.Error, ValueError):
        return False
    return True


def decoded_size(payload: str) -> int:
    """Decoded byte count from the base64 length alone (whitespace ignored)."""
    n = len(payload)
    if any(c in payload for c in " \n\r\t"):
        payload = "".join(payload.split())
        n = len(payload)
    pad = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    return n * 3 // 4 - pad


class ImageLimits(Stage):
    """Non-vision models get a text placeholder (409 when an image has no alt text); images over
    ``CHAT_PROXY_MAX_IMAGE_BYTES`` are 413; undecodable base64 is 400."""

    name = "images"
    order = 400

    async def request(self, ctx: ChatContext) -> None:
        messages = ctx.body["messages"]
        parts = list(image_parts(messages))
        ctx.images = len(parts)
        if not parts:
            return
        entry = ctx.entry
        if entry is not None and not entry.vision:
            missing = [p for _, _, p in parts if alt_text_of(p) is None]
            if missing:
                raise ProxyError(
                    409,
                    "capability_mismatch",
                    f"Model {ctx.model!r} does not support images and {len(missing)} image(s) have no alt text. "
                    "Pick a vision model or remove the images.",
                    param="messages",
                )
            for msg, i, part in parts:
                msg["content"][i] = {"type": "text", "text": f"{PLACEHOLDER} (alt: {alt_text_of(part)})"}
            return
        limit = self.config.max_image_bytes
        for _, _, part in parts:
            url = image_url_of(part)
            if not url:
                raise ProxyError(400, "invalid_image", "An image_url part has no url.", param="messages")
            if url.startswith(("http://", "https://")):
                continue
            split = split_data_url(url)
            if split is None:
                raise ProxyError(
                    400, "invalid_image", "Image URLs must be data: URLs or http(s) URLs.", param="messages"
                )
            _mime, payload = split
            size = decoded_size(payload)
            if size > limit:
                raise ProxyError(
                    413,
                    "payload_too_large",
                    f"An image is {size} bytes decoded; the limit is {limit} bytes (CHAT_PROXY_MAX_IMAGE_BYTES).",
                    param="messages",
                )
            if not is_base64(payload):
                raise ProxyError(
                    400, "invalid_image", "An image's base64 data cannot be decoded.", param="messages"
                )
