"""A fake OpenAI/vLLM upstream (aiohttp) for tests. The requested ``model`` picks the behaviour:

echo, tools, tools_object_args, legacy, json_tool, reasoning, minimal, huge, slow_headers, slow_first_chunk,
hang, drop, error400_flat, error404, error500, error200, midstream_error, slow_stream, not_json,
json_for_stream. ``/v1/embeddings`` (vectors of the text; ``minimal``: bare vectors, floats only, no usage)
and ``/v1/completions`` (``echo: <prompt>``, streamed word by word; ``minimal``, ``error404``,
``json_for_stream``) answer too.
Every request is recorded in ``app[REQUESTS]`` (body and headers); cancelled streams in ``app[CANCELLED]``.
A test can also script a stream exactly: ``app[SCRIPTS][name] = [chunk dict or raw bytes, ...]`` streams those
events (then ``[DONE]``) for ``model == name``; chunk dicts get id/object/created/model filled in.
Like vLLM, the fake answers 400 when ``stream_options`` comes with a non-streamed request; like OpenAI and
vLLM, 400 to ``tools: []``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import zlib
from typing import Any

from aiohttp import web

REQUESTS: web.AppKey[list[dict[str, Any]]] = web.AppKey("requests", list)
CANCELLED: web.AppKey[list[str]] = web.AppKey("cancelled", list)
SCRIPTS: web.AppKey[dict[str, list[Any]]] = web.AppKey("scripts", dict)
DELAY = 1.0  # seconds, for the slow modes


def _last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages", [])):
        if msg.get("role") == "user":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            return " ".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    obj = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _completion(model: str, message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1767225600,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "refusal": None, **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    return resp


def _error(status: int, message: str, etype: str, param: str | None = None, code: Any = None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code if code else status}}
    return web.json_response(body, status=status)


def _refusal(body: dict[str, Any]) -> web.Response | None:
    """What OpenAI and vLLM refuse whatever the mode: ``stream_options`` without ``stream``, ``tools: []``."""
    if body.get("stream_options") and not body.get("stream"):
        return _error(400, "Stream options can only be defined when `stream=True`.", "BadRequestError",
                      "stream_options")
    if body.get("tools") == []:
        text = (
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array "
            "instead."
        )
        return _error(400, text, "invalid_request_error", "tools", "empty_array")
    return None


def _fixed_answer(mode: str) -> web.Response | None:
    """The modes that answer the same whatever was asked (errors, odd replies)."""
    if mode == "error400_flat":
        flat = {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError",
                "param": None, "code": 400}
        return web.json_response(flat, status=400)
    if mode == "error404":
        return _error(404, "The model `x` does not exist.", "NotFoundError")
    if mode == "error500":
        return web.json_response(
            {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}}, status=500
        )
    if mode == "error200":  # an error body with HTTP 200, whatever was asked
        return web.json_response({"object": "error", "message": "prompt is too long",
                                  "type": "BadRequestError", "param": None, "code": 400})
    if mode == "json_for_stream":  # ignores stream: true and answers with a completion
        return web.json_response(_completion(mode, {"content": "whole answer"}))
    if mode == "not_json":
        return web.Response(text="<html>oops</html>", content_type="text/html")
    return None


_WEATHER = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}


def _message(mode: str, text: str) -> tuple[dict[str, Any], str]:
    """The non-streamed message of ``mode`` and its finish reason."""
    if mode in ("tools", "tools_object_args"):
        args: Any = {"city": "Paris"} if mode == "tools_object_args" else '{"city": "Paris"}'
        call = {**_WEATHER, "function": {"name": "get_weather", "arguments": args}}
        return {"content": None, "tool_calls": [call]}, "tool_calls"
    if mode == "legacy":
        legacy = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        return {"content": None, "function_call": legacy}, "function_call"
    if mode == "json_tool":
        return {"content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}, "stop"
    if mode == "reasoning":
        return {"content": "42", "reasoning": "think hard"}, "stop"
    return {"content": text}, "stop"


def _events(mode: str, text: str) -> list[bytes]:
    """The SSE events of a streamed reply in ``mode`` (the timed and broken modes are handled apart)."""
    if mode in ("tools", "tools_object_args"):
        head = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                                            "arguments": ""}}
        second = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time",
                                                                              "arguments": "{}"}}
        return [
            _chunk(mode, {"role": "assistant", "content": None, "tool_calls": [head]}),
            *(_chunk(mode, {"tool_calls": [{"index": 0, "function": {"arguments": frag}}]})
              for frag in ('{"city"', ': "Par', 'is"}')),
            _chunk(mode, {"tool_calls": [second]}),
            _chunk(mode, {}, "tool_calls"),
        ]
    if mode == "legacy":
        return [
            _chunk(mode, {"role": "assistant", "function_call": {"name": "get_weather", "arguments": ""}}),
            _chunk(mode, {"function_call": {"arguments": '{"city": "Paris"}'}}),
            _chunk(mode, {}, "function_call"),
        ]
    if mode == "json_tool":
        frags = ('{"name": "get_weather", ', '"arguments": {"city": "Paris"}}')
        return [_chunk(mode, {"role": "assistant", "content": ""}),
                *(_chunk(mode, {"content": frag}) for frag in frags), _chunk(mode, {}, "stop")]
    if mode == "reasoning":
        return [_chunk(mode, {"role": "assistant", "reasoning": "think"}), _chunk(mode, {"content": "42"}),
                _chunk(mode, {}, "stop")]
    if mode == "huge":
        return [_chunk(mode, {"role": "assistant", "content": "x" * 200_000}), _chunk(mode, {}, "stop")]
    words = [_chunk(mode, {"content": word + " "}) for word in text.split(" ")]
    return [_chunk(mode, {"role": "assistant", "content": ""}), *words, _chunk(mode, {}, "stop")]


async def _misbehave(request: web.Request, resp: web.StreamResponse, mode: str) -> bool:
    """The streamed modes that break or stall; True when the reply is over."""
    if mode == "midstream_error":
        await resp.write(_chunk(mode, {"role": "assistant", "content": "partial"}))
        await resp.write(
            b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'
        )
        return True
    if mode == "hang":
        await resp.write(_chunk(mode, {"role": "assistant", "content": "partial"}))
        await asyncio.sleep(3600)
    if mode == "drop":
        await resp.write(_chunk(mode, {"role": "assistant", "content": "partial"}))
        request.transport.close()
        return True
    if mode == "slow_stream":
        await resp.write(_chunk(mode, {"role": "assistant", "content": ""}))
        for i in range(600):
            await resp.write(_chunk(mode, {"content": f"w{i} "}))
            await asyncio.sleep(0.05)
        await resp.write(_chunk(mode, {}, "stop"))
    return False


async def _stream(request: web.Request, mode: str, text: str, usage: bool) -> web.StreamResponse:
    resp = await _sse(request)
    try:
        if mode == "slow_first_chunk":
            await asyncio.sleep(DELAY)
        if mode in ("midstream_error", "hang", "drop", "slow_stream"):
            if await _misbehave(request, resp, mode):
                return resp
        else:
            for event in _events(mode, text):
                await resp.write(event)
        if usage:
            tokens = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            last = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1767225600,
                    "model": mode, "choices": [], "usage": tokens}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
    except asyncio.CancelledError:
        request.app[CANCELLED].append(mode)
        raise
    return resp


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[REQUESTS].append({"body": body, "headers": dict(request.headers)})
    mode = body.get("model", "echo")
    refused = _refusal(body)
    if refused is not None:
        return refused
    if mode == "slow_headers":
        await asyncio.sleep(DELAY)
    if mode in request.app[SCRIPTS]:
        return await _scripted(request, mode, request.app[SCRIPTS][mode])
    fixed = _fixed_answer(mode)
    if fixed is not None:
        return fixed
    text = "echo: " + _last_user_text(body)
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, mode, text, usage)
    if mode == "minimal":
        return web.json_response({"choices": [{"message": {"content": text}}]})
    message, finish = _message(mode, text)
    return web.json_response(_completion(mode, message, finish))


def _bad_request(message: str, param: str | None = None) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return web.json_response({"error": error}, status=400)


def _not_found(model: Any) -> web.Response:
    return web.json_response(
        {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "param": None,
                   "code": 404}},
        status=404,
    )


def _vector(text: str, dims: int) -> list[float]:
    return [round((zlib.crc32(f"{i}:{text}".encode()) % 2000 - 1000) / 1000, 4) for i in range(dims)]


async def embeddings(request: web.Request) -> web.Response:
    """``/v1/embeddings`` as OpenAI and vLLM answer it (8 dimensions, or ``dimensions``)."""
    body = await request.json()
    request.app[REQUESTS].append({"body": body, "headers": dict(request.headers), "path": request.path})
    mode, text = body.get("model"), body.get("input")
    if mode == "error404":
        return _not_found(mode)
    if isinstance(text, str) and text:
        inputs: list[Any] = [text]
    elif isinstance(text, list) and text and all(isinstance(t, (str, int, list)) for t in text):
        inputs = [text] if all(isinstance(t, int) for t in text) else text
    else:
        return _bad_request("'$.input' is invalid. Please check the API reference.", "input")
    vectors = [_vector(str(item), body.get("dimensions") or 8) for item in inputs]
    if mode == "minimal":  # a bare server: no object, index or usage, and floats whatever was asked
        return web.json_response({"data": [{"embedding": v} for v in vectors]})
    b64 = body.get("encoding_format") == "base64"
    data = [
        {"object": "embedding", "index": i,
         "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else v}
        for i, v in enumerate(vectors)
    ]
    tokens = sum(len(item) if isinstance(item, list) else len(str(item).split()) for item in inputs)
    return web.json_response({"object": "list", "data": data, "model": mode,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _text_chunk(mode: str, text: str, finish: str | None = None, **extra: Any) -> bytes:
    obj = {"id": "cmpl-fake", "object": "text_completion", "created": 1767225600, "model": mode,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    """``/v1/completions`` (legacy text completions): ``echo: <prompt>``, streamed word by word."""
    body = await request.json()
    request.app[REQUESTS].append({"body": body, "headers": dict(request.headers), "path": request.path})
    mode, stream = body.get("model"), bool(body.get("stream"))
    if body.get("stream_options") and not stream:
        return _bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    if mode == "error404":
        return _not_found(mode)
    text = f"echo: {body.get('prompt')}"
    words = len(text.split())
    usage = {"prompt_tokens": 4, "completion_tokens": words, "total_tokens": 4 + words}
    if not stream or mode == "json_for_stream":
        if mode == "minimal":
            return web.json_response({"choices": [{"text": text}]})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        return web.json_response({"id": "cmpl-fake", "object": "text_completion", "created": 1767225600,
                                  "model": mode, "usage": usage, "choices": [choice]})
    resp = await _sse(request)
    for word in text.split(" "):
        await resp.write(_text_chunk(mode, word + " "))
    await resp.write(_text_chunk(mode, "", "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(_text_chunk(mode, "", choices=[], usage=usage))
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _scripted(request: web.Request, mode: str, events: list[Any]) -> web.StreamResponse:
    resp = await _sse(request)
    try:
        for event in events:
            if isinstance(event, bytes):
                await resp.write(event)
            else:
                obj = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1767225600,
                    "model": mode,
                    **event,
                }
                await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
    except asyncio.CancelledError:
        request.app[CANCELLED].append(mode)
        raise
    return resp


def scripted_entry(base_url: str, name: str, vision: bool = False) -> dict[str, Any]:
    """A registry entry ``m-<name>`` whose served id selects the script ``name``."""
    return {
        "name": f"m-{name}",
        "backend": "openai",
        "backend_config": {"base_url": base_url},
        "served_model_id": name,
        "capabilities": ["vision", "tools"] if vision else ["tools"],
    }


async def health(request: web.Request) -> web.Response:
    return web.json_response({})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})


def make_fake_openai() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[REQUESTS] = []
    app[CANCELLED] = []
    app[SCRIPTS] = {}
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


MODES = (
    "echo",
    "tools",
    "tools_object_args",
    "legacy",
    "json_tool",
    "reasoning",
    "minimal",
    "huge",
    "slow_headers",
    "slow_first_chunk",
    "hang",
    "drop",
    "error400_flat",
    "error404",
    "error500",
    "error200",
    "midstream_error",
    "slow_stream",
    "not_json",
    "json_for_stream",
)


def registry_for(base_url: str, backend: str = "openai", vision: bool = False) -> list[dict[str, Any]]:
    """One registry entry per mode, named ``m-<mode>``, served id ``<mode>``."""
    return [
        {
            "name": f"m-{mode}",
            "backend": backend,
            "backend_config": {"base_url": base_url},
            "served_model_id": mode,
            "capabilities": ["vision", "tools"] if vision else ["tools"],
        }
        for mode in MODES
    ]


def now() -> float:
    return time.monotonic()
