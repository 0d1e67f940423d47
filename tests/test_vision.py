"""Vision preprocessing seen from outside: what image a fake upstream receives, and what the request log
says. Images are made with Pillow the way a phone or a browser makes them."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from imageworks_proxy.testing.fakes.openai import REQUESTS, make_fake_openai
from tests.openai_schemas import validate_error
from tests.proxy_helpers import log_records

ORIENTATION = 0x0112


def photo(width: int, height: int, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """A picture whose left half is blue and right half red (so a rotation shows), encoded as ``fmt``."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, width // 2, height))
    out = io.BytesIO()
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        extra["exif"] = exif.tobytes()
    if fmt == "GIF":
        image = image.convert("P")
    image.save(out, fmt, **extra)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def turn(*urls: str, kind: str = "image_url") -> list[dict]:
    parts = [{"type": "text", "text": "What is in this picture?"}]
    for url in urls:
        parts.append({"type": kind, "image_url": url if kind == "input_image" else {"url": url}})
    return [{"role": "user", "content": parts}]


def received_images(fake) -> list[Image.Image]:
    """The images in the last request the fake upstream received, opened with Pillow."""
    out = []
    for msg in fake[REQUESTS][-1]["body"]["messages"]:
        for part in msg["content"] if isinstance(msg["content"], list) else ():
            ref = part.get("image_url")
            url = ref["url"] if isinstance(ref, dict) else ref
            if url:
                out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


@pytest.fixture
def env(aiohttp_server, registry_file, make_config, proxy_client, openai_sdk):
    """start(backend="vllm", metadata=None, **config) -> (client, fake, sdk): one vision entry ``vis``
    served by a fake OpenAI-compatible upstream that records what it receives (``vllm`` + base_url:
    vllm-external)."""

    async def start(backend="vllm", metadata=None, capabilities=("vision",), **overrides):
        fake = make_fake_openai()
        server = await aiohttp_server(fake)
        registry_file([{"name": "vis", "backend": backend, "served_model_id": "echo",
                        "backend_config": {"base_url": str(server.make_url("/v1"))},
                        "capabilities": list(capabilities), "metadata": metadata or {}}])
        client = await proxy_client(make_config(**overrides))
        return client, fake, openai_sdk(client)

    return start


async def test_a_4000x3000_photo_reaches_a_vision_vllm_entry_at_the_target_edge_and_the_log_says_so(env):
    client, fake, sdk = await env()
    original = photo(4000, 3000)
    reply = await sdk.chat.completions.create(model="vis", messages=turn(data_url(original)))
    assert reply.choices[0].message.content == "echo: What is in this picture?"
    [got] = received_images(fake)
    assert got.size == (448, 336) and got.format == "JPEG"
    [record] = await log_records(client)
    assert record["images"] == 1 and record["images_resized"] == 1
    [resize] = record["image_resizes"]
    assert resize["from"] == [4000, 3000] and resize["to"] == [448, 336]
    assert resize["bytes_before"] == len(original) and 0 < resize["bytes_after"] < len(original)


async def test_the_target_edge_comes_from_the_entry_then_the_setting(env):
    for metadata, settings, edge in [
        ({"vision_target_long_edge": 672}, {}, 672),
        ({"vision": {"target_long_edge": "896"}}, {}, 896),
        ({}, {"vision_target_long_edge": "512"}, 512),
    ]:
        _, fake, sdk = await env(metadata=metadata, **settings)
        await sdk.chat.completions.create(model="vis", messages=turn(data_url(photo(1200, 1600))))
        assert received_images(fake)[0].size == (edge * 3 // 4, edge)


async def test_exif_orientation_is_applied_when_the_photo_is_resized(env):
    _, fake, sdk = await env()
    # stored 1600x1200 with orientation 6: the camera was held upright, the picture is shown turned 90° right
    await sdk.chat.completions.create(model="vis", messages=turn(data_url(photo(1600, 1200, orientation=6))))
    [got] = received_images(fake)
    assert got.size == (336, 448)
    top, bottom = got.convert("RGB").getpixel((168, 10)), got.convert("RGB").getpixel((168, 437))
    assert top[2] > 200 and top[0] < 50  # the blue left half is now on top
    assert bottom[0] > 200 and bottom[2] < 50


async def test_png_stays_png_input_image_parts_count_and_a_small_image_is_sent_untouched(env):
    _, fake, sdk = await env()
    small = data_url(photo(320, 240), "image/jpeg")
    big_png = data_url(photo(2000, 1000, "PNG"), "image/png")
    resp = await sdk.chat.completions.with_raw_response.create(
        model="vis", messages=turn(big_png, small, kind="input_image"))
    assert resp.http_response.status_code == 200
    parts = fake[REQUESTS][-1]["body"]["messages"][0]["content"]
    assert parts[2]["image_url"] == small  # byte for byte: not decoded, not re-encoded
    png = received_images(fake)[0]
    assert png.format == "PNG" and png.size == (448, 224)


async def test_the_same_image_twice_in_a_conversation_is_resized_once(env):
    client, fake, sdk = await env(vision_truncate_history="0")
    url = data_url(photo(1000, 1000))
    messages = turn(url) + [{"role": "assistant", "content": "A flag."}] + turn(url)
    await sdk.chat.completions.create(model="vis", messages=messages)
    assert [im.size for im in received_images(fake)] == [(448, 448), (448, 448)]
    [record] = await log_records(client)
    assert record["images"] == 2 and record["images_resized"] == 1


@pytest.mark.parametrize(
    "settings, backend",
    [({"vision_downscale": "0"}, "vllm"), ({}, "openai"), ({"vision_downscale_backends": "ollama"}, "vllm")],
    ids=["switched-off", "other-backend", "backend-not-listed"],
)
async def test_images_pass_untouched_where_downscaling_does_not_apply(env, settings, backend):
    client, fake, sdk = await env(backend=backend, **settings)
    await sdk.chat.completions.create(model="vis", messages=turn(data_url(photo(1200, 900))))
    assert received_images(fake)[0].size == (1200, 900)
    [record] = await log_records(client)
    assert record["images_resized"] == 0 and "image_resizes" not in record


@pytest.mark.parametrize("backends", ["openai", "openai-passthrough", "*"])
async def test_the_backends_setting_names_registry_backends_or_adapters(env, backends):
    _, fake, sdk = await env(backend="openai", vision_downscale_backends=backends)
    await sdk.chat.completions.create(model="vis", messages=turn(data_url(photo(1200, 900))))
    assert received_images(fake)[0].size == (448, 336)


async def test_a_decompression_bomb_is_413_and_an_unreadable_image_400_before_anything_is_sent(env):
    client, fake, _ = await env()
    for data, status, code in [(png_claiming(40_000, 40_000), 413, "payload_too_large"),
                               (png_claiming(12_000, 12_000), 413, "payload_too_large"),
                               (b"GIF89a but not really an image", 400, "invalid_image")]:
        body = {"model": "vis", "messages": turn(data_url(data))}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == status
        body = await resp.json()
        validate_error(body)
        assert body["error"]["code"] == code
    assert fake[REQUESTS] == []


async def test_gif_and_webp_reach_ollama_as_png_and_jpeg_as_it_was(aiohttp_server, registry_file, make_config,
                                                                   proxy_client):
    fake = FakeOllama()
    server = await aiohttp_server(fake.app())
    registry_file([ollama_entry(str(server.make_url("")).rstrip("/"))])
    client = await proxy_client(make_config())
    gif, webp, jpeg = photo(64, 48, "GIF"), photo(64, 48, "WEBP"), photo(64, 48)
    messages = turn(data_url(gif, "image/gif"), data_url(webp, "image/webp"), data_url(jpeg))
    resp = await client.post("/v1/chat/completions", json={"model": "llama3.2 3b", "messages": messages})
    assert resp.status == 200, await resp.text()
    sent = [base64.b64decode(b) for b in fake.chats[-1]["messages"][-1]["images"]]
    assert [Image.open(io.BytesIO(b)).format for b in sent] == ["PNG", "PNG", "JPEG"]
    assert [Image.open(io.BytesIO(b)).size for b in sent] == [(64, 48)] * 3
    assert sent[2] == jpeg
