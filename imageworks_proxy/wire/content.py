"""Message content parts: the one home for recognising image parts and reading ``data:`` URLs.

Clients send images as Chat Completions ``image_url`` parts (``{"type": "image_url", "image_url":
{"url": ...}}``, some with a bare string) or as Responses-style ``input_image`` parts (``{"type":
"input_image", "image_url": "..."}``). Every stage and adapter treats both the same way through these
functions. Sizes are computed from the base64 length and image types from the first few bytes, never by
decoding the whole image (a multi-megabyte image must not block the event loop); :meth:`DataUrl.decode`
is for worker threads. What is done with the pixels is in :mod:`imageworks_proxy.wire.imaging`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from imageworks_proxy.errors import ProxyError

IMAGE_PART_TYPES = frozenset({"image_url", "input_image"})
_ALT_KEYS = ("alt", "alt_text", "detail_text")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_WHITESPACE = " \n\r\t"


def is_image_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES


def image_url_of(part: Mapping[str, Any]) -> str | None:
    """The URL of an image part: ``image_url.url``, or ``image_url`` itself when it is a string."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, Mapping) else ref
    return url if isinstance(url, str) and url else None


def with_image_url(part: Mapping[str, Any], url: str) -> dict[str, Any]:
    """A copy of an image part pointing at ``url``, in the part's own form."""
    ref = part.get("image_url")
    return {**part, "image_url": {**ref, "url": url} if isinstance(ref, Mapping) else url}


def alt_text_of(part: Mapping[str, Any]) -> str | None:
    """The alt text of an image part (``alt``, ``alt_text`` or ``detail_text``, on the part or on its
    ``image_url`` object), else ``None``."""
    ref = part.get("image_url")
    for holder in (part, ref if isinstance(ref, Mapping) else {}):
        for key in _ALT_KEYS:
            value = holder.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def image_parts(messages: Any) -> Iterator[tuple[dict[str, Any], int, dict[str, Any]]]:
    """(message, part index, part) for every image part, of either kind, in ``messages``."""
    if not isinstance(messages, list):
        return
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            for i, part in enumerate(content):
                if is_image_part(part):
                    yield msg, i, part


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


@attrs.frozen
class DataUrl:
    """A parsed ``data:<mime>;base64,<payload>`` URL (the payload still base64)."""

    mime: str
    payload: str

    @property
    def size(self) -> int:
        """Decoded size in bytes."""
        return decoded_size(self.payload)

    def sniffed_type(self) -> str | None:
        """The image type its first bytes show (``image/png``, ``image/jpeg``, ``image/gif``,
        ``image/webp``, ``image/bmp``, ``image/tiff``), whatever the URL claims; ``None``: none of those.
        Decodes only the first few base64 characters."""
        return sniff_image_type(base64_head(self.payload))

    def decode(self) -> bytes:
        """The decoded bytes (the whole payload: run it off the event loop for big images). Raises 400
        ``invalid_image`` for malformed base64."""
        try:
            return base64.b64decode(self.payload)
        except (binascii.Error, ValueError):
            raise ProxyError(
                400, "invalid_image", "An image's base64 data cannot be decoded.", param="messages"
            ) from None


def data_url(mime: str, data: bytes) -> str:
    """``data:<mime>;base64,<data>``."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def base64_head(payload: str, chars: int = 16) -> bytes:
    """The bytes encoded by the first ``chars`` base64 characters of ``payload`` (whitespace skipped);
    ``b""`` when they do not decode."""
    head = "".join(payload[: chars * 2].split())[:chars]
    head = head[: len(head) - len(head) % 4]
    try:
        return base64.b64decode(head)
    except (binascii.Error, ValueError):
        return b""


def sniff_image_type(head: bytes) -> str | None:
    """The image type that the first bytes of a file show, by their magic numbers; ``None`` when unknown."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"BM"):
        return "image/bmp"
    return None


def parse_data_url(url: str) -> DataUrl | None:
    """``None`` for a URL that is not a ``data:`` URL. Raises 400 ``invalid_image`` for a ``data:`` URL
    that is not base64 or carries no data."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise ProxyError(
            400, "invalid_image", "Image data URLs must be base64 encoded (data:<type>;base64,...).",
            param="messages",
        )
    payload = payload.strip()
    if not payload:
        raise ProxyError(400, "invalid_image", "An image data URL has no data.", param="messages")
    return DataUrl(head[5:-7].strip() or "application/octet-stream", payload)


def decoded_size(payload: str) -> int:
    """Decoded byte count of base64 text from its length alone (whitespace ignored)."""
    if any(c in payload for c in _WHITESPACE):
        payload = "".join(payload.split())
    pad = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    return max(len(payload) * 3 // 4 - pad, 0)


def is_base64(payload: str) -> bool:
    """Well-formed base64 (line breaks tolerated), checked without decoding: a few C-speed passes
    instead of a full decode."""
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


def describe_data_url(url: str) -> str | None:
    """``<image/png 123456 bytes>`` for a ``data:`` URL (for logs; no decoding), else ``None``."""
    if not url.startswith("data:"):
        return None
    head, _, payload = url.partition(",")
    mime = head[5:].split(";", 1)[0] or "application/octet-stream"
    size = decoded_size(payload) if ";base64" in head.lower() else len(payload)
    return f"<{mime} {size} bytes>"
