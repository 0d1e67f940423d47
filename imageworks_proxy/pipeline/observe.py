"""The observability stage: every request on an adapter route (chat, embeddings, text completions) ends
in one request-log record and one metrics sample, whatever happened to it.

It runs last (order 1100). While a reply passes through it counts the reply's characters (for a token
estimate when the backend reports no usage) and, only when ``CHAT_PROXY_LOG_PROMPTS=1``, keeps the reply
text and tool calls. ``finish`` builds the record; the log writer and the metrics do the rest without
blocking the request.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import CHAT, COMPLETIONS, EMBEDDINGS
from imageworks_proxy.observability.metrics import Sample
from imageworks_proxy.observability.recent import RequestSummary, shorten
from imageworks_proxy.observability.requestlog import redact_messages
from imageworks_proxy.pipeline.stage import ChatContext, Stage

log = logging.getLogger("imageworks_proxy.observe")

#: Rough characters per token, for estimates only (records say ``tokens_estimated: true``).
CHARS_PER_TOKEN = 4


class _Reply:
    """What the stage gathers from a streamed reply (choice 0)."""

    __slots__ = ("calls", "chars", "parts", "reasoning", "usage")

    def __init__(self) -> None:
        self.chars = 0
        self.parts: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.calls: dict[int, dict[str, Any]] | None = None
        self.usage: dict[str, Any] | None = None


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    n = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                n += len(part["text"])
    return n


def estimate_prompt_tokens(messages: Any) -> int:
    """A rough prompt size: text characters / 4 plus a few tokens of framing per message."""
    if not isinstance(messages, list):
        return 0
    chars = sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
    return math.ceil(chars / CHARS_PER_TOKEN) + 4 * len(messages)


def estimate_input_tokens(value: Any) -> int:
    """A text completion's prompt or an embeddings input: characters / 4, token ids counted as they are."""
    if isinstance(value, str):
        return math.ceil(len(value) / CHARS_PER_TOKEN)
    if isinstance(value, list):
        return sum(estimate_input_tokens(v) if isinstance(v, (str, list)) else 1 for v in value)
    return 0


#: What the log keeps of a request's own text with CHAT_PROXY_LOG_PROMPTS=1, by route.
_PROMPT_FIELD = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}


def _merge_call(calls: dict[int, dict[str, Any]], delta_call: Any) -> None:
    if not isinstance(delta_call, dict):
        return
    index = delta_call.get("index", 0)
    call = calls.get(index)
    fn = delta_call.get("function") or {}
    if call is None:
        call = calls[index] = {"id": delta_call.get("id"), "type": delta_call.get("type") or "function",
                               "function": {"name": fn.get("name"), "arguments": ""}}
    else:
        if delta_call.get("id") and not call["id"]:
            call["id"] = delta_call["id"]
        if fn.get("name") and not call["function"]["name"]:
            call["function"]["name"] = fn["name"]
    args = fn.get("arguments")
    if isinstance(args, str):
        call["function"]["arguments"] += args


def _tokens(ctx: ChatContext, st: _Reply | None) -> tuple[int | None, int | None, bool]:
    """Prompt and completion tokens as the backend counted them, else estimated (and said so)."""
    usage = ctx.usage if isinstance(ctx.usage, dict) else (st.usage if st is not None else None)
    if usage is not None:
        completion = usage.get("completion_tokens", 0 if ctx.endpoint == EMBEDDINGS else None)
        return usage.get("prompt_tokens"), completion, False
    if ctx.first_byte is None and (st is None or not st.chars):
        return None, None, False  # nothing reached a backend
    # The backend answered but said nothing about tokens: estimate.
    if ctx.endpoint == CHAT:
        prompt = estimate_prompt_tokens(ctx.body.get("messages"))
    else:
        prompt = estimate_input_tokens(ctx.body.get(_PROMPT_FIELD.get(ctx.endpoint, "")))
    return prompt, math.ceil(st.chars / CHARS_PER_TOKEN) if st is not None else 0, True

class ObserveStage(Stage):
    name = "observe"
    order = 1100
    endpoints = frozenset({CHAT, EMBEDDINGS, COMPLETIONS})

    def __init__(self, app, config) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app, config)
        self.keep_prompts = config.log_prompts
        self.metrics = keys.metrics(app) if config.enable_metrics else None
        self.prom = app.get(keys.PROMETHEUS)
        rlog = keys.request_log(app)
        self.request_log = rlog if rlog.enabled else None
        self.recent = app.get(keys.RECENT)

    # --- reply side ------------------------------------------------------------------------------

    def response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        choices = completion.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        if not isinstance(message, dict):
            if isinstance(first, dict) and isinstance(first.get("text"), str):  # a text completion
                self._text_reply(ctx, first["text"], completion)
            return completion
        if self.keep_prompts:
            reply: dict[str, Any] = {"content": message.get("content")}
            if message.get("reasoning_content"):
                reply["reasoning_content"] = message["reasoning_content"]
            if message.get("tool_calls"):
                reply["tool_calls"] = message["tool_calls"]
            ctx.reply = reply
        if ctx.usage is None and not isinstance(completion.get("usage"), dict):
            st = ctx.state[self.name] = _Reply()
            st.chars = _text_chars(message.get("content")) + _text_chars(message.get("reasoning_content"))
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict):
                    st.chars += len(str((call.get("function") or {}).get("arguments") or ""))
        return completion

    def _text_reply(self, ctx: ChatContext, text: str, completion: dict[str, Any]) -> None:
        if self.keep_prompts:
            ctx.reply = {"text": text}
        if ctx.usage is None and not isinstance(completion.get("usage"), dict):
            st = ctx.state[self.name] = _Reply()
            st.chars = len(text)

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        st = ctx.state.get(self.name)
        if st is None:
            st = ctx.state[self.name] = _Reply()
            if self.keep_prompts:
                st.parts, st.reasoning, st.calls = [], [], {}
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            st.usage = usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not delta or choice.get("index", 0) != 0:
                text = choice.get("text") if delta is None and isinstance(choice, dict) else None
                if text and isinstance(text, str) and choice.get("index", 0) == 0:  # a text completion
                    st.chars += len(text)
                    if st.parts is not None:
                        st.parts.append(text)
                continue
            content = delta.get("content")
            if content:
                st.chars += len(content)
                if st.parts is not None:
                    st.parts.append(content)
            reasoning = delta.get("reasoning_content")
            if reasoning:
                st.chars += len(reasoning)
                if st.reasoning is not None:
                    st.reasoning.append(reasoning)
            calls = delta.get("tool_calls")
            if calls:
                for call in calls:
                    args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                    if isinstance(args, str):
                        st.chars += len(args)
                    if st.calls is not None:
                        _merge_call(st.calls, call)
        return [chunk]

    # --- the end of every request ------------------------------------------------------------------

    def _reply(self, ctx: ChatContext, st: _Reply | None) -> dict[str, Any] | None:
        if ctx.reply is not None or st is None or st.parts is None:
            return ctx.reply
        if ctx.endpoint == COMPLETIONS:
            return {"text": "".join(st.parts)}
        reply: dict[str, Any] = {"content": "".join(st.parts) if st.parts else None}
        if st.reasoning:
            reply["reasoning_content"] = "".join(st.reasoning)
        if st.calls:
            reply["tool_calls"] = [st.calls[i] for i in sorted(st.calls)]
        return reply

    def finish(self, ctx: ChatContext) -> None:
        try:
            self._finish(ctx)
        except Exception:  # observability must never turn a served request into a failure
            log.exception("recording request %s for the log and metrics failed", ctx.request_id)

    def _finish(self, ctx: ChatContext) -> None:
        now = time.perf_counter()
        started = ctx.started
        duration_ms = (now - started) * 1000
        first_byte = ctx.first_byte
        ttft_ms = (first_byte - started) * 1000 if first_byte is not None else None
        st: _Reply | None = ctx.state.get(self.name)
        prompt_tokens, completion_tokens, estimated = _tokens(ctx, st)
        entry = ctx.entry
        logical = entry.name if entry is not None else None
        error_code = ctx.error_code
        if error_code is not None and not isinstance(error_code, str):  # a plugin's odd code
            error_code = str(error_code)
        status, adapter, queue = ctx.status, ctx.adapter_name, ctx.queue_ms
        if self.metrics is not None:
            sample = Sample(logical, adapter, status, error_code, duration_ms, ttft_ms, queue, prompt_tokens,
                            completion_tokens)
            self.metrics.record(sample)
            if self.prom is not None:
                self.prom.record(sample)
        if self.recent is None and self.request_log is None:
            return
        arrived = time.time() - (now - started)
        duration = round(duration_ms, 1)
        ttft = round(ttft_ms, 1) if ttft_ms is not None else None
        queue_ms = round(queue, 1)
        if self.recent is not None:
            # figures and names only: the status page never sees prompt or reply text
            self.recent.add_request(RequestSummary(
                arrived, ctx.request_id, logical or shorten(ctx.model or None), adapter, ctx.stream, status,
                error_code, duration, ttft, queue_ms, prompt_tokens, completion_tokens, estimated,
            ))
        if self.request_log is None:
            return
        resized = ctx.images_resized
        record: dict[str, Any] = {
            # arrival time, as a POSIX timestamp the writer turns into ISO-8601 UTC off the event loop
            "ts": arrived,
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "model": ctx.model or None,
            "logical_name": logical,
            "backend": entry.backend if entry is not None else None,
            "adapter": adapter,
            "stream": ctx.stream,
            "status": status,
            "error_code": error_code,
            "duration_ms": duration,
            "ttft_ms": ttft,
            "queue_ms": queue_ms,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "tokens_estimated": estimated,
            "images": ctx.images,
            "truncated_messages": ctx.truncated_messages,
            "images_resized": len(resized) if resized else 0,
            "capabilities": ctx.capabilities.names() if ctx.capabilities is not None else None,
            "adapted": list(ctx.adapted),
        }
        if resized:
            record["image_resizes"] = resized
        if self.keep_prompts:
            if ctx.endpoint == CHAT:
                record["messages"] = redact_messages(ctx.body.get("messages"))
            else:
                field = _PROMPT_FIELD.get(ctx.endpoint, "prompt")
                record[field] = ctx.body.get(field)
            record["reply"] = self._reply(ctx, st)
        self.request_log.submit(record)
