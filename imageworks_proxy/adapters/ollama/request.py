"""OpenAI Chat Completions -> Ollama native ``/api/chat``: the request translation, pure (no I/O).

:func:`to_ollama_request` turns an OpenAI body into an ``/api/chat`` payload; images from ``http(s)``
URLs must be fetched first (:func:`image_urls` lists them) and images of types Ollama cannot read
converted (``images.png_where_needed``), both passed in as ``fetched``. The answer's way back is
:mod:`.response`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError
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
#: OpenAI ``reasoning_effort`` -> Ollama ``think`` (true/false or "low"/"medium"/"high"/"max"; Ollama refuses
#: any other string).
_REASONING_EFFORT = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "max",
    "max": "max",
}
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
            if url in fetched:  # fetched, or converted to a type Ollama reads
                images.append(fetched[url])
                continue
            data = parse_data_url(url)
            if data is not None:
                images.append(data.payload)  # Ollama takes the base64 text without the data: prefix
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
    think = body.get("think")
    if isinstance(think, bool):
        return think
    if isinstance(think, str):  # Ollama-native clients; an effort name is taken as OpenAI's
        return _REASONING_EFFORT.get(think.lower(), think)
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort.lower() in _REASONING_EFFORT:
        return _REASONING_EFFORT[effort.lower()]
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, Mapping) and isinstance(kwargs.get("enable_thinking"), bool):
        return kwargs["enable_thinking"]
    return None


def generation_options(body: Mapping[str, Any], num_ctx: int | None) -> dict[str, Any]:
    """Ollama ``options`` for an OpenAI request's sampling fields (``max_tokens`` → ``num_predict``,
    ``stop``, Ollama-only options sent as top-level fields, an ``options`` object as is)."""
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

    ``fetched`` maps each ``http(s)`` image URL of :func:`image_urls`, and each ``data:`` URL whose image
    was converted to PNG (``images.png_where_needed``), to the base64 data Ollama gets. ``num_ctx``
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
    options = generation_options(body, num_ctx)
    if options:
        payload["options"] = options
    fmt = _format(body.get("response_format"))
    if fmt is not None:
        payload["format"] = fmt
    think = _think(body)
    if think is not None:
        payload["think"] = think
    chosen = keep_alive_for(body, keep_alive)
    if chosen is not None:
        payload["keep_alive"] = chosen
    return payload


def keep_alive_for(body: Mapping[str, Any], configured: str | int | float | None) -> str | int | float | None:
    """The request's own ``keep_alive`` (an Ollama-native client's), else the configured one."""
    value = body.get("keep_alive")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    return configured
