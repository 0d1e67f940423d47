"""OpenAI Chat Completions <-> Ollama native ``/api/chat``: pure translation, no I/O.

Request side: :func:`to_ollama_request` turns an OpenAI body into an ``/api/chat`` payload (images from
``http(s)`` URLs must be fetched first and passed in as ``fetched``). Response side:
:func:`completion_from_ollama` builds a ``chat.completion`` from a non-streamed reply, and
:class:`ChunkTranslator` turns NDJSON stream lines (split by :class:`NdjsonSplitter`) into
``chat.completion.chunk`` dicts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.wire import ids
from imageworks_proxy.wire.content import image_parts, image_url_of, is_image_part, is_remote, parse_data_url

#: OpenAI request fields that map one-to-one onto an Ollama ``options`` key.
_OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "min_p": "min_p",
}
#: Ollama-only options a client may send as top-level fields (OpenWebUI "custom params" do this).
_OLLAMA_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_predict",
        "num_keep",
        "num_batch",
        "num_gpu",
        "num_thread",
        "repeat_penalty",
        "repeat_last_n",
        "typical_p",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
        "use_mmap",
        "numa",
        "low_vram",
        "main_gpu",
    }
)
_REASONING_EFFORT = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high"}
_NUM_CTX_FLAGS = ("--num-ctx", "--num_ctx")


# -- request -------------------------------------------------------------------------------------
def parse_num_ctx(extra_args: Sequence[str]) -> int | None:
    """``--num-ctx N`` (or ``--num-ctx=N``) from an entry's ``extra_args``; ``None`` when absent or not
    a number."""
    args = list(extra_args)
    for i, arg in enumerate(args):
        value: str | None = None
        if arg in _NUM_CTX_FLAGS and i + 1 < len(args):
            value = args[i + 1]
        else:
            for flag in _NUM_CTX_FLAGS:
                if arg.startswith(flag + "="):
                    value = arg[len(flag) + 1 :]
        if value is not None:
            try:
                n = int(value)
            except ValueError:
                return None
            return n if n > 0 else None
    return None


def keep_alive_value(raw: str | None) -> str | int | float | None:
    """The configured keep-alive as Ollama wants it: numbers as numbers (seconds), durations as strings."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        return float(text)
    return text


def _image_url(part: Mapping[str, Any]) -> str:
    url = image_url_of(part)
    if url is None:
        raise ProxyError(400, "invalid_image", "An image part has no url.", param="messages")
    return url


def image_urls(body: Mapping[str, Any]) -> list[str]:
    """The distinct ``http(s)`` image URLs in the request, in order: what the proxy must fetch."""
    seen: dict[str, None] = {}
    for _msg, _i, part in image_parts(body.get("messages")):
        url = _image_url(part)
        if is_remote(url):
            seen.setdefault(url, None)
    return list(seen)


def _text_and_images(content: Any, fetched: Mapping[str, str], where: str) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ProxyError(
            400, "invalid_request", f"{where}.content must be a string or a list of parts", param=where
        )
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif is_image_part(part):
            url = _image_url(part)
            data = parse_data_url(url)
            if data is not None:
                images.append(data.payload)  # Ollama takes the base64 text without the data: prefix
            elif url in fetched:
                images.append(fetched[url])
            else:
                raise ProxyError(
                    400, "invalid_image", "image URLs must be data: or http(s) URLs", param=where
                )
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            texts.append(part["text"])  # text, input_text
        elif isinstance(part, Mapping) and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        # other parts (files, audio) have no Ollama counterpart and are dropped
    return "\n".join(texts), images


def _arguments_object(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
    raise ProxyError(
        400, "invalid_request", f"{where}.function.arguments must be a JSON object (as a string)", param=where
    )


def _translate_messages(messages: Any, fetched: Mapping[str, str]) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise ProxyError(400, "invalid_request", "messages must be a list", param="messages")
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}  # tool call id -> function name, for tool-result messages
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ProxyError(400, "invalid_request", f"{where} must be an object", param=where)
        role = str(msg.get("role") or "user").lower()
        if role == "developer":
            role = "system"
        elif role == "function":  # legacy function result
            role = "tool"
        text, images = _text_and_images(msg.get("content"), fetched, where)
        new: dict[str, Any] = {"role": role, "content": text}
        if images:
            new["images"] = images
        if role == "assistant":
            thinking = msg.get("reasoning_content") or msg.get("reasoning") or msg.get("thinking")
            if isinstance(thinking, str) and thinking:
                new["thinking"] = thinking
            calls = []
            for j, call in enumerate(msg.get("tool_calls") or ()):
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise ProxyError(
                        400, "invalid_request", f"{where}.tool_calls[{j}] needs function.name", param=where
                    )
                item: dict[str, Any] = {
                    "function": {
                        "index": j,
                        "name": fn["name"],
                        "arguments": _arguments_object(fn.get("arguments"), f"{where}.tool_calls[{j}]"),
                    }
                }
                if isinstance(call.get("id"), str) and call["id"]:
                    item["id"] = call["id"]
                    tool_names[call["id"]] = fn["name"]
                calls.append(item)
            legacy = msg.get("function_call")
            if not calls and isinstance(legacy, Mapping) and isinstance(legacy.get("name"), str):
                calls.append(
                    {
                        "function": {
                            "index": 0,
                            "name": legacy["name"],
                            "arguments": _arguments_object(legacy.get("arguments"), where),
                        }
                    }
                )
            if calls:
                new["tool_calls"] = calls
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if isinstance(call_id, str) and call_id:
                new["tool_call_id"] = call_id
            name = tool_names.get(call_id) if isinstance(call_id, str) else None
            name = name or (msg.get("name") if isinstance(msg.get("name"), str) else None)
            if name:
                new["tool_name"] = name
        out.append(new)
    return out


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = [
        t
        for t in body.get("tools") or ()
        if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
    ]
    out = [
        {"type": "function", "function": dict(t["function"])}
        for t in tools
        if t.get("type", "function") == "function"
    ]
    if not out:
        # legacy ``functions``
        out = [
            {"type": "function", "function": dict(f)}
            for f in body.get("functions") or ()
            if isinstance(f, Mapping)
        ]
    return out


def _format(response_format: Any) -> Any:
    if not isinstance(response_format, Mapping):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return schema if isinstance(schema, Mapping) else "json"
    return None


def _think(body: Mapping[str, Any]) -> Any:
    if "think" in body and isinstance(body["think"], (bool, str)):
        return body["think"]
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort.lower() in _REASONING_EFFORT:
        return _REASONING_EFFORT[effort.lower()]
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, Mapping) and isinstance(kwargs.get("enable_thinking"), bool):
        return kwargs["enable_thinking"]
    return None


def _options(body: Mapping[str, Any], num_ctx: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if num_ctx:
        options["num_ctx"] = num_ctx
    for field, option in _OPTION_FIELDS.items():
        if body.get(field) is not None:
            options[option] = body[field]
    for field in _OLLAMA_OPTIONS:
        if body.get(field) is not None:
            options[field] = body[field]
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list) and stop:
        options["stop"] = [s for s in stop if isinstance(s, str)]
    extra = body.get("options")
    if isinstance(extra, Mapping):  # Ollama-native clients
        options.update(extra)
    return options


def to_ollama_request(
    body: Mapping[str, Any],
    *,
    model: str,
    stream: bool,
    num_ctx: int | None = None,
    keep_alive: str | int | float | None = None,
    fetched: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``/api/chat`` payload for an OpenAI request ``body``.

    ``fetched`` maps each ``http(s)`` image URL of :func:`image_urls` to its base64 data. ``num_ctx``
    (from the registry) is the default context size; a request's own ``num_ctx`` wins. Raises
    :class:`ProxyError` 400 for messages Ollama cannot take.
    """
    payload: dict[str, Any] = {
        "model": model,
        "messages": _translate_messages(body.get("messages"), fetched or {}),
        "stream": stream,  # explicit: Ollama's default is true
    }
    tools = _tools(body)
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        # Ollama has no tool_choice; offering only the named tool is the closest it gets.
        named = [t for t in tools if t["function"].get("name") == choice["function"].get("name")]
        tools = named or tools
    if tools and choice != "none":
        payload["tools"] = tools
    options = _options(body, num_ctx)
    if options:
        payload["options"] = options
    fmt = _format(body.get("response_format"))
    if fmt is not None:
        payload["format"] = fmt
    think = _think(body)
    if think is not None:
        payload["think"] = think
    request_keep_alive = body.get("keep_alive")
    if isinstance(request_keep_alive, (str, int, float)) and not isinstance(request_keep_alive, bool):
        payload["keep_alive"] = request_keep_alive
    elif keep_alive is not None:
        payload["keep_alive"] = keep_alive
    return payload


# -- response ------------------------------------------------------------------------------------
def _arguments_json(raw: Any) -> str:
    if isinstance(raw, str):
        return raw if raw.strip() else "{}"
    return orjson.dumps(raw if raw is not None else {}).decode()


def _finish_reason(done_reason: Any, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def usage_from(data: Mapping[str, Any]) -> dict[str, int]:
    prompt = int(data.get("prompt_eval_count") or 0)
    completion = int(data.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_call(call: Any) -> tuple[str, str, str]:
    """(id, name, JSON arguments) of one Ollama tool call."""
    fn = call.get("function") if isinstance(call, Mapping) else None
    fn = fn if isinstance(fn, Mapping) else {}
    call_id = call.get("id") if isinstance(call, Mapping) else None
    if not isinstance(call_id, str) or not call_id:
        call_id = ids.tool_call_id()
    return call_id, str(fn.get("name") or ""), _arguments_json(fn.get("arguments"))


def completion_from_ollama(
    data: Mapping[str, Any], *, model: str, completion_id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """A ``chat.completion`` for a non-streamed ``/api/chat`` reply; ``model`` is the id the client
    asked for."""
    msg = data.get("message") if isinstance(data.get("message"), Mapping) else {}
    content = msg.get("content") if isinstance(msg.get("content"), str) else ""
    calls = [_tool_call(c) for c in msg.get("tool_calls") or ()]
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in calls
        ]
        if not content:
            message["content"] = None
    thinking = msg.get("thinking")
    if isinstance(thinking, str) and thinking:
        message["reasoning_content"] = thinking
    return {
        "id": completion_id or ids.completion_id(),
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(data.get("done_reason"), bool(calls)),
            }
        ],
        "usage": usage_from(data),
    }


class ChunkTranslator:
    """Turns ``/api/chat`` NDJSON lines into ``chat.completion.chunk`` dicts for one stream.

    Feed every decoded line to :meth:`feed`; it returns the chunks to send (role first; content and
    reasoning deltas; each tool call as one delta with index, id, type, name and its JSON arguments, since
    Ollama sends calls whole; on ``done`` the finish chunk and, with ``include_usage``, the usage chunk).
    Raises :class:`ProxyError` for an ``{"error": ...}`` line.
    """

    def __init__(self, *, model: str, include_usage: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = ids.completion_id()
        self.created = int(time.time())
        self.finished = False
        self.usage: dict[str, int] | None = None
        self._started = False
        self._tool_calls = 0

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def feed(self, line: Any) -> list[dict[str, Any]]:
        if not isinstance(line, Mapping):
            raise ProxyError(502, "backend_error", "Ollama sent a stream line that is not a JSON object")
        if "error" in line:
            raise ProxyError(502, "backend_error", f"Ollama error: {error_text(line['error'])}")
        out: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        msg = line.get("message") if isinstance(line.get("message"), Mapping) else {}
        # Oversized deltas are cut into pieces by the SSE writer (sse.py), so each field goes out whole here.
        thinking = msg.get("thinking")
        if isinstance(thinking, str) and thinking:
            out.append(self._chunk({"reasoning_content": thinking}))
        content = msg.get("content")
        if isinstance(content, str) and content:
            out.append(self._chunk({"content": content}))
        for call in msg.get("tool_calls") or ():
            index = self._tool_calls
            self._tool_calls += 1
            call_id, name, args = _tool_call(call)
            first = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            out.append(self._chunk({"tool_calls": [first]}))
        if line.get("done"):
            self.finished = True
            self.usage = usage_from(line)
            out.append(self._chunk({}, _finish_reason(line.get("done_reason"), self._tool_calls > 0)))
            if self.include_usage:
                out.append(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self.usage,
                    }
                )
        return out


class NdjsonSplitter:
    """Splits a byte stream into NDJSON lines without aiohttp's line-length cap (PROTOCOLS §6.4)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        end = self._buf.rfind(b"\n")
        if end < 0:
            return []
        complete = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return [line for line in complete.split(b"\n") if line.strip()]

    def close(self) -> list[bytes]:
        """Whatever followed the last newline (a final line without ``\\n``)."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [rest] if rest.strip() else []


def decode_line(line: bytes) -> Any:
    """One NDJSON line; :class:`ProxyError` 502 when it is not JSON."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ProxyError(
            502, "backend_error", f"Ollama sent a line that is not JSON: {line[:200]!r}"
        ) from None


def error_text(value: Any) -> str:
    """Ollama's error is a string; tolerate an OpenAI-style object too."""
    if isinstance(value, Mapping):
        value = value.get("message") or value
    return str(value)


def error_from_body(raw: bytes) -> str | None:
    """The ``error`` string of an Ollama error body, or ``None`` when the body is not one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, Mapping) and data.get("error"):
        return error_text(data["error"])
    return None
