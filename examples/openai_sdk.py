"""Talk to a running imageworks-chat-proxy with the official ``openai`` SDK: a plain reply, a streamed
reply, a tool call round trip and a question about an image.

    python examples/openai_sdk.py [BASE_URL] [--model ID] [--vision-model ID] [--steps LIST]

LIST is a comma-separated choice of plain, stream, tools and image (default: all four).

BASE_URL defaults to $IMAGEWORKS_PROXY_URL, then $OPENAI_BASE_URL, then http://127.0.0.1:8100/v1. The API key
is $OPENAI_API_KEY (one of CHAT_PROXY_API_KEYS when the proxy has keys; anything otherwise). Without --model
the first listed model is used; without --vision-model the first one that takes images.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import struct
import sys
import zlib

import openai

DEFAULT_URL = "http://127.0.0.1:8100/v1"
STEPS = ("plain", "stream", "tools", "image")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in UTC, as ISO 8601.",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }
]


def get_time() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def red_square_png(size: int = 32) -> bytes:
    """A small solid red PNG, made with the standard library only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def plain(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello in five words."}], max_tokens=64
    )
    print(f"[plain] {reply.choices[0].message.content}")


def stream(client: openai.OpenAI, model: str) -> None:
    print("[stream] ", end="", flush=True)
    chunks = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            usage = chunk.usage
    print()
    if usage:
        print(f"[stream] usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")


def tools(client: openai.OpenAI, model: str) -> None:
    messages: list[dict] = [{"role": "user", "content": "What time is it in UTC? Use the tool."}]
    for _ in range(3):  # the model may call the tool, then answers with its result
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=128)
        message = reply.choices[0].message
        if not message.tool_calls:
            print(f"[tools] {message.content}")
            return
        messages.append(
            {
                "role": "assistant",
                "content": message.content,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in message.tool_calls
                ],
            }
        )
        for call in message.tool_calls:
            args = json.loads(call.function.arguments or "{}")
            result = get_time() if call.function.name == "get_time" else f"unknown tool {call.function.name}"
            print(f"[tools] model called {call.function.name}({json.dumps(args)}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    print("[tools] the model kept calling tools; giving up")


def image(client: openai.OpenAI, model: str) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(red_square_png()).decode()
    reply = client.chat.completions.create(
        model=model,
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What colour is this picture? One word."},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            }
        ],
    )
    print(f"[image] {reply.choices[0].message.content}")


def pick_models(client: openai.OpenAI, model: str | None, vision: str | None) -> tuple[str, str | None]:
    listed = client.models.list().data
    if not listed and not model:
        raise SystemExit("the proxy lists no models (see CHAT_PROXY_INCLUDE_NON_INSTALLED in the README)")
    model = model or listed[0].id
    if vision is None:
        for m in listed:
            ext = (m.model_extra or {}).get("extensions") or {}
            if "image" in (ext.get("modalities") or ()):
                vision = m.id
                break
    return model, vision


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "base_url",
        nargs="?",
        default=os.environ.get("IMAGEWORKS_PROXY_URL") or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL,
    )
    p.add_argument("--model")
    p.add_argument("--vision-model")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated: " + ",".join(STEPS))
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown step(s): {', '.join(sorted(unknown))}")

    client = openai.OpenAI(
        base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "unused", max_retries=0
    )
    try:
        model, vision = pick_models(client, args.model, args.vision_model)
        print(f"proxy {args.base_url}, model {model!r}, vision model {vision!r}")
        for step in steps:
            if step == "image":
                if vision is None:
                    print("[image] skipped: no listed model takes images (use --vision-model)")
                    continue
                image(client, vision)
            else:
                globals()[step](client, model)
    except openai.APIStatusError as exc:
        print(f"error: HTTP {exc.status_code} {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as exc:
        print(f"error: cannot reach the proxy at {args.base_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
