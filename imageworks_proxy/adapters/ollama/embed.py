"""OpenAI embeddings <-> Ollama native ``/api/embed``, pure (no I/O).

:func:`to_embed_request` turns a ``/v1/embeddings`` body into an ``/api/embed`` payload;
:func:`embeddings_from_ollama` turns the answer into OpenAI's ``list`` of ``embedding`` objects (base64,
when the client asks for it, is the embeddings stage's job: pipeline/embeddings.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from imageworks_proxy.adapters.ollama.request import keep_alive_for
from imageworks_proxy.errors import ProxyError


def to_embed_request(
    body: Mapping[str, Any], *, model: str, keep_alive: str | int | float | None = None
) -> dict[str, Any]:
    """The ``/api/embed`` payload for an OpenAI embeddings ``body``.

    ``input`` goes as it is (a string or a list of strings; Ollama takes no token ids: 400), and so do
    ``dimensions`` and Ollama's own ``truncate`` and ``options``.
    """
    text = body.get("input")
    if not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
        raise ProxyError(
            400,
            "invalid_request",
            "Ollama embeds text only: 'input' must be a string or a list of strings, not token ids.",
            param="input",
        )
    payload: dict[str, Any] = {"model": model, "input": text}
    dims = body.get("dimensions")
    if isinstance(dims, int) and not isinstance(dims, bool) and dims > 0:
        payload["dimensions"] = dims
    if isinstance(body.get("truncate"), bool):
        payload["truncate"] = body["truncate"]
    if isinstance(body.get("options"), Mapping):
        payload["options"] = dict(body["options"])
    chosen = keep_alive_for(body, keep_alive)
    if chosen is not None:
        payload["keep_alive"] = chosen
    return payload


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else list(vector)


def embeddings_from_ollama(
    data: Mapping[str, Any], *, model: str, dimensions: int | None = None
) -> dict[str, Any]:
    """The OpenAI embeddings answer for an ``/api/embed`` reply; ``model`` is the id the client asked for.

    A vector longer than ``dimensions`` is cut and normalised again, as Ollama itself does: an Ollama too
    old to know ``dimensions`` ignores it. ``usage`` counts Ollama's ``prompt_eval_count``.
    """
    vectors = data.get("embeddings")
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise ProxyError(502, "backend_error", "Ollama sent an /api/embed answer without embeddings.")
    items = []
    for i, vector in enumerate(vectors):
        if dimensions and len(vector) > dimensions:
            vector = _unit(vector[:dimensions])
        items.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = data.get("prompt_eval_count")
    tokens = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0
    return {
        "object": "list",
        "data": items,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
