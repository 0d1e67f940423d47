"""The ``POST /v1/embeddings`` stages: the request's check, and an answer that validates against OpenAI's
``CreateEmbeddingResponse`` whatever the backend sent (base64 vectors when the client asked for them)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from imageworks_proxy.adapters.base import EMBEDDINGS
from imageworks_proxy.errors import ProxyError, invalid_request
from imageworks_proxy.pipeline.request import check_model
from imageworks_proxy.pipeline.stage import ChatContext, Stage

_INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def input_kind(value: Any) -> str | None:
    """``text`` (a string or strings) or ``tokens`` (token ids, or lists of them); ``None`` when ``value``
    is neither, or empty (OpenAI refuses an empty string or list too)."""
    if isinstance(value, str):
        return "text" if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return "text"
    if all(_is_int(v) for v in value):
        return "tokens"
    if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
        return "tokens"
    return None


def encode_base64(vector: list[float]) -> str:
    """A vector as OpenAI's ``encoding_format: "base64"`` sends it: little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


class ValidateEmbeddings(Stage):
    """400 for an embeddings body the proxy cannot route; unknown fields are kept and forwarded."""

    name = "validate-embeddings"
    order = 100
    endpoints = frozenset({EMBEDDINGS})

    async def request(self, ctx: ChatContext) -> None:
        body = ctx.body
        model = check_model(body)
        if input_kind(body.get("input")) is None:
            raise invalid_request(f"'input' must be {_INPUT_SHAPES}, and not empty.", "input")
        if body.get("encoding_format") not in (None, "float", "base64"):
            raise invalid_request("'encoding_format' must be \"float\" or \"base64\".", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and not (_is_int(dims) and dims >= 1):
            raise invalid_request("'dimensions' must be an integer of at least 1.", "dimensions")
        ctx.model = model
        ctx.stream = False  # the route has no streaming


class EmbeddingsConformance(Stage):
    """Fill in what OpenAI's schema requires (``object``, each item's ``object`` and ``index``, ``usage``),
    name the model the client asked for, and encode vectors as base64 when the client asked for that and
    the backend sent floats. An answer without a ``data`` list is a 502."""

    name = "embeddings-conformance"
    order = 1000
    endpoints = frozenset({EMBEDDINGS})

    def response(self, ctx: ChatContext, answer: dict[str, Any]) -> dict[str, Any]:
        data = answer.get("data")
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            who = ctx.entry.name if ctx.entry is not None else ctx.model
            raise ProxyError(
                502, "backend_error", f"The backend for {who!r} sent an embeddings answer with no data list."
            )
        answer["object"] = "list"
        answer["model"] = ctx.model or answer.get("model") or ""
        b64 = ctx.body.get("encoding_format") == "base64"
        for i, item in enumerate(data):
            item["object"] = "embedding"
            if not _is_int(item.get("index")):
                item["index"] = i
            if b64 and isinstance(item.get("embedding"), list):
                item["embedding"] = encode_base64(item["embedding"])
        usage = answer.get("usage")
        if isinstance(usage, dict) and _is_int(usage.get("prompt_tokens")):
            if not _is_int(usage.get("total_tokens")):
                usage["total_tokens"] = usage["prompt_tokens"]
            ctx.usage = usage
        else:  # the log estimates the tokens instead (tokens_estimated)
            answer["usage"] = {"prompt_tokens": 0, "total_tokens": 0}
        return answer
