"""OpenAI legacy text completions <-> Ollama native ``/api/generate``, pure (no I/O).

:func:`to_generate_request` turns a ``/v1/completions`` body into an ``/api/generate`` payload (prompt,
``suffix`` for fill-in-the-middle, ``max_tokens`` → ``num_predict``, ``stop``, sampling options);
:func:`completion_from_generate` and :class:`GenerateTranslator` turn the answer, whole or streamed as
NDJSON, into ``text_completion`` objects. Ollama's ``thinking`` text is not part of a completion and is
dropped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from imageworks_proxy.adapters.ollama.request import generation_options, keep_alive_for
from imageworks_proxy.adapters.ollama.response import stream_line, usage_from
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.wire import ids

#: OpenAI's ``max_tokens`` default for text completions (vLLM's too); Ollama's is unbounded.
DEFAULT_MAX_TOKENS = 16


def _one_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ProxyError(
            400,
            "invalid_request",
            "Ollama completes one text prompt per request: 'prompt' must be a string (or a list of one "
            "string), not token ids or several prompts.",
            param="prompt",
        )
    return prompt


def to_generate_request(
    body: Mapping[str, Any],
    *,
    model: str,
    stream: bool,
    num_ctx: int | None = None,
    keep_alive: str | int | float | None = None,
) -> dict[str, Any]:
    """The ``/api/generate`` payload for an OpenAI text completion ``body``. Raises :class:`ProxyError`
    400 for what Ollama cannot do (token-id prompts, several prompts, ``n`` > 1)."""
    prompt = _one_prompt(body)
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        raise ProxyError(
            400, "invalid_request", "Ollama returns one completion per request: 'n' must be 1.", param="n"
        )
    payload: dict[str, Any] = {"model": model, "prompt": prompt, "stream": stream}
    suffix = body.get("suffix")
    if isinstance(suffix, str) and suffix:
        payload["suffix"] = suffix
    options = generation_options(body, num_ctx)
    options.setdefault("num_predict", DEFAULT_MAX_TOKENS)
    payload["options"] = options
    # Ollama's own switches, for clients that know them: no prompt template, thinking on or off
    if isinstance(body.get("raw"), bool):
        payload["raw"] = body["raw"]
    if isinstance(body.get("think"), (bool, str)):
        payload["think"] = body["think"]
    chosen = keep_alive_for(body, keep_alive)
    if chosen is not None:
        payload["keep_alive"] = chosen
    return payload


def _finish_reason(done_reason: Any) -> str:
    return "length" if done_reason == "length" else "stop"


def completion_from_generate(
    data: Mapping[str, Any], *, model: str, echo: str | None = None
) -> dict[str, Any]:
    """A ``text_completion`` for a non-streamed ``/api/generate`` reply; ``model`` is the id the client
    asked for, ``echo`` the prompt to put before the text (the request's ``echo``)."""
    text = data.get("response") if isinstance(data.get("response"), str) else ""
    return {
        "id": ids.text_completion_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": (echo or "") + text,
                "logprobs": None,
                "finish_reason": _finish_reason(data.get("done_reason")),
            }
        ],
        "usage": usage_from(data),
    }


class GenerateTranslator:
    """Turns ``/api/generate`` NDJSON lines into ``text_completion`` chunks for one stream.

    :meth:`feed` takes each decoded line and returns the chunks to send: the echoed prompt first (when
    asked), one chunk per piece of text, on ``done`` the finish chunk and the usage chunk
    (``choices: []``; the conformance stage passes it on only to a client that asked for usage). Raises
    :class:`ProxyError` 502 for an ``{"error": ...}`` line.
    """

    def __init__(self, *, model: str, echo: str | None = None) -> None:
        self.model = model
        self.id = ids.text_completion_id()
        self.created = int(time.time())
        self.finished = False
        self.usage: dict[str, int] | None = None
        self._echo = echo or None

    def _chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }

    def feed(self, line: Any) -> list[dict[str, Any]]:
        line = stream_line(line)
        out: list[dict[str, Any]] = []
        if self._echo is not None:
            out.append(self._chunk(self._echo))
            self._echo = None
        text = line.get("response")
        if isinstance(text, str) and text:
            out.append(self._chunk(text))
        if line.get("done"):
            self.finished = True
            self.usage = usage_from(line)
            out.append(self._chunk("", _finish_reason(line.get("done_reason"))))
            usage_chunk = self._chunk("")
            usage_chunk["choices"], usage_chunk["usage"] = [], self.usage
            out.append(usage_chunk)
        return out
