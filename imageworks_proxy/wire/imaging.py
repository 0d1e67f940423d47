"""Image pixels through Pillow: downscaling for vision models, PNG for backends that read PNG and JPEG only.

Pillow does what hand-written code should not: decoding every common format, EXIF orientation, good
resampling. These functions are blocking (decoding a 12-megapixel photo takes tens of milliseconds):
call them through ``asyncio.to_thread``. Every image is checked against Pillow's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``) on its header, before a pixel is decoded, so a small file that claims a
huge canvas is refused instead of filling memory.
"""

from __future__ import annotations

import io

import attrs
from PIL import Image, ImageOps, UnidentifiedImageError

from imageworks_proxy.errors import ProxyError

#: JPEG quality of a downscaled JPEG (the other formats become PNG, which is lossless).
JPEG_QUALITY = 85
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations that turn the picture by 90 degrees


@attrs.frozen
class Downscaled:
    """What :func:`downscale` did to one image. Sizes are ``(width, height)`` as the picture is seen (EXIF
    orientation applied); ``data`` is ``None`` when the image was small enough and is to be sent as it was."""

    before: tuple[int, int]
    after: tuple[int, int]
    data: bytes | None = None
    mime: str | None = None


def _open(data: bytes) -> Image.Image:
    """Open ``data`` lazily (header only). Raises 400 ``invalid_image`` for what Pillow cannot read and 413
    ``payload_too_large`` for more pixels than Pillow's decompression-bomb limit."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        image = None
    except UnidentifiedImageError:
        raise ProxyError(
            400, "invalid_image", "An image is in no format the proxy can read.", param="messages"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ProxyError(
            400, "invalid_image", f"An image cannot be read: {exc}", param="messages"
        ) from None
    limit = Image.MAX_IMAGE_PIXELS
    if image is None or (limit and image.width * image.height > limit):
        size = f" ({image.width}x{image.height})" if image is not None else ""
        raise ProxyError(
            413,
            "payload_too_large",
            f"An image has more pixels than the limit of {limit}{size}; send a smaller image.",
            param="messages",
        )
    return image


def _seen_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def _resizable(image: Image.Image) -> Image.Image:
    """``image`` in a mode that LANCZOS resizing and PNG/JPEG encoding both handle (palette images would
    otherwise be resized with nearest-neighbour)."""
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return image
    transparent = image.mode in ("PA", "RGBa") or "transparency" in image.info
    return image.convert("RGBA" if transparent else "RGB")


def _encode(image: Image.Image, jpeg: bool) -> tuple[bytes, str]:
    out = io.BytesIO()
    if jpeg and image.mode in ("RGB", "L"):
        image.save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), "image/jpeg"
    image.save(out, "PNG")
    return out.getvalue(), "image/png"


def downscale(data: bytes, long_edge: int) -> Downscaled:
    """Shrink an image whose longer side is over ``long_edge`` pixels to exactly that (LANCZOS, aspect
    kept, EXIF orientation applied); a JPEG stays a JPEG (quality 85), anything else becomes a PNG. An image
    already small enough is not decoded and not re-encoded (``data`` is ``None``). Blocking; raises
    :class:`ProxyError` as :func:`_open` does, or 400 ``invalid_image`` for a file that breaks off."""
    with _open(data) as image:
        before = _seen_size(image)
        if max(before) <= long_edge:
            return Downscaled(before, before)
        try:
            jpeg = image.format == "JPEG"
            work = _resizable(image)
            # a JPEG is decoded at a reduced scale first (Pillow's draft mode), then resampled with LANCZOS
            work.thumbnail((long_edge, long_edge), Image.Resampling.LANCZOS)
            work = ImageOps.exif_transpose(work)
            encoded, mime = _encode(work, jpeg)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ProxyError(
                400, "invalid_image", f"An image cannot be decoded: {exc}", param="messages"
            ) from None
        return Downscaled(before, work.size, encoded, mime)


def to_png(data: bytes) -> bytes:
    """The image (its first frame, for animations) as a PNG, EXIF orientation applied. Blocking; raises
    :class:`ProxyError` as :func:`_open` does, or 400 ``invalid_image`` for a file that breaks off."""
    with _open(data) as image:
        try:
            work = ImageOps.exif_transpose(_resizable(image))
            return _encode(work, jpeg=False)[0]
        except (OSError, ValueError, SyntaxError) as exc:
            raise ProxyError(
                400, "invalid_image", f"An image cannot be decoded: {exc}", param="messages"
            ) from None
