"""The request/response stages as plain objects, without HTTP."""

from __future__ import annotations

import pytest

from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.pipeline.request import DefaultSystemPrompt, GenerationDefaults
from imageworks_proxy.pipeline.stage import ChatContext
from imageworks_proxy.pipeline.toolcalls import (
    LOOKS_LIKE_A_CALL,
    NOT_A_CALL,
    UNDECIDED,
    ToolCallSynthesis,
    call_prefix,
    calls_from_content,
)
from imageworks_proxy.pipeline.truncation import truncate_history
from imageworks_proxy.upstream.urls import apply_loopback_alias, entry_base_url


def img(n: int) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{'A' * 4 * n}"}}


def turn(text: str, image: int | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}] + ([img(image)] if image else [])
    return [{"role": "user", "content": content}, {"role": "assistant", "content": f"re {text}"}]


def test_truncation_keeps_system_and_current_turn_and_carries_the_image():
    msgs = (
        [{"role": "system", "content": "sys"}]
        + turn("a", image=1)
        + turn("b")
        + [{"role": "user", "content": "and now?"}]
    )
    kept, dropped = truncate_history(msgs, keep_system=True, keep_last_n_turns=0)
    assert dropped == 4
    assert [m["role"] for m in kept] == ["system", "user"]
    current = kept[-1]["content"]
    assert current[0] == img(1) and current[-1] == {"type": "text", "text": "and now?"}


def test_truncation_keeps_last_n_turns_whole_with_tool_results():
    tool_turn = [
        {"role": "user", "content": "w?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "sunny"},
    ]
    msgs = turn("a") + tool_turn + [{"role": "user", "content": [{"type": "text", "text": "q"}, img(2)]}]
    kept, dropped = truncate_history(msgs, keep_system=True, keep_last_n_turns=1)
    assert dropped == 2
    assert kept[:4] == tool_turn and kept[-1] == msgs[-1]


def test_truncation_can_drop_system_messages_and_uses_newest_dropped_image():
    msgs = (
        [{"role": "system", "content": "s"}]
        + turn("a", image=1)
        + turn("b", image=2)
        + [{"role": "user", "content": "q"}]
    )
    kept, dropped = truncate_history(msgs, keep_system=False, keep_last_n_turns=0)
    assert dropped == 5
    assert kept[0]["role"] == "user" and kept[0]["content"][0] == img(2)


def test_truncation_carries_no_older_image_when_a_kept_turn_still_shows_one():
    msgs = turn("a", image=1) + turn("b", image=2) + [{"role": "user", "content": "and now?"}]
    kept, dropped = truncate_history(msgs, keep_system=True, keep_last_n_turns=1)
    assert dropped == 2
    assert kept == msgs[2:]  # image 2 is still in the history; image 1 is not pushed into the question


def _ctx(body, entry=None):
    return ChatContext(request_id="r", body=body, app=None, entry=entry, model="m")  # type: ignore[arg-type]


async def test_default_system_prompt_only_when_none_given(make_config):
    entry = parse_entry(
        {"name": "e", "backend": "openai", "metadata": {"default_system_prompt": "Be terse."}}
    )
    stage = DefaultSystemPrompt(None, make_config())  # type: ignore[arg-type]
    ctx = _ctx({"messages": [{"role": "user", "content": "x"}]}, entry)
    await stage.request(ctx)
    assert ctx.body["messages"][0] == {"role": "system", "content": "Be terse."}
    ctx = _ctx({"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "x"}]}, entry)
    await stage.request(ctx)
    assert [m["content"] for m in ctx.body["messages"]] == ["mine", "x"]


async def test_generation_defaults_fill_only_what_the_request_omits(make_config):
    entry = parse_entry(
        {
            "name": "e",
            "backend": "openai",
            "generation_defaults": {
                "temperature": 0.2,
                "top_k": 20,
                "max_tokens": 512,
                "stop_sequences": ["</s>"],
            },
        }
    )
    stage = GenerationDefaults(None, make_config())  # type: ignore[arg-type]
    ctx = _ctx({"messages": [], "temperature": 0.9, "max_completion_tokens": 10}, entry)
    await stage.request(ctx)
    assert ctx.body["temperature"] == 0.9 and ctx.body["top_k"] == 20 and ctx.body["stop"] == ["</s>"]
    assert "max_tokens" not in ctx.body


def test_content_heuristic_needs_an_offered_tool_name():
    assert calls_from_content('{"name": "f", "arguments": {"a": 1}}', frozenset({"f"}))[0]["function"] == {
        "name": "f",
        "arguments": '{"a":1}',
    }
    assert calls_from_content('```json\n{"name": "f", "parameters": {}}\n```', frozenset({"f"}))
    assert calls_from_content('{"name": "g", "arguments": {}}', frozenset({"f"})) is None
    assert calls_from_content("The answer is {x}", frozenset({"f"})) is None


@pytest.mark.parametrize(
    "start, verdict",
    [
        ("```python\n", NOT_A_CALL),
        ("`x` is", NOT_A_CALL),
        ("{x} is", NOT_A_CALL),
        ("[1] Smith", NOT_A_CALL),
        ("{}", NOT_A_CALL),
        ("``", UNDECIDED),
        ("```", UNDECIDED),
        ("```js", UNDECIDED),
        ("```json\n", UNDECIDED),
        ("  {", UNDECIDED),
        ("[ ", UNDECIDED),
        ('{"name"', LOOKS_LIKE_A_CALL),
        ('```JSON\n[ {"fun', LOOKS_LIKE_A_CALL),
        ('```\n{"name": "f"}', LOOKS_LIKE_A_CALL),
    ],
)
def test_a_streamed_reply_is_held_back_only_while_its_start_can_be_a_json_call(start, verdict):
    assert call_prefix(start) == verdict


def test_streamed_tool_calls_get_index_and_id_once(make_config):
    stage = ToolCallSynthesis(None, make_config())  # type: ignore[arg-type]
    ctx = _ctx({"messages": []})
    first = {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"id": "x", "function": {"name": "f", "arguments": {"a": 1}}}]},
            }
        ]
    }
    again = {
        "choices": [
            {"index": 0, "delta": {"tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "!"}}]}}
        ]
    }
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    out = [c for chunk in (first, again, end) for c in stage.chunk(ctx, chunk)]
    d0 = out[0]["choices"][0]["delta"]["tool_calls"][0]
    assert d0 == {
        "index": 0,
        "id": "x",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a":1}'},
    }
    assert out[1]["choices"][0]["delta"]["tool_calls"][0] == {"index": 0, "function": {"arguments": "!"}}
    assert out[2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "url, alias, expected",
    [
        ("http://localhost:11434", "host.docker.internal", "http://host.docker.internal:11434"),
        ("http://127.0.0.1:8000/v1", "host.docker.internal", "http://host.docker.internal:8000/v1"),
        ("http://[::1]:8000/v1", "gw", "http://gw:8000/v1"),
        ("http://10.0.0.5:8000/v1", "gw", "http://10.0.0.5:8000/v1"),
        ("http://localhost:8000/v1", None, "http://localhost:8000/v1"),
    ],
)
def test_loopback_alias_rewrites_only_loopback_hosts(url, alias, expected):
    assert apply_loopback_alias(url, alias) == expected


def test_entry_base_url_forms():
    e = lambda bc: parse_entry({"name": "e", "backend": "openai", "backend_config": bc})  # noqa: E731
    kw = {"default_port": None, "default_url": None, "path": "/v1"}
    assert entry_base_url(e({"base_url": "http://h:1/v1/"}), **kw) == "http://h:1/v1"
    assert entry_base_url(e({"host": "h", "port": 2}), **kw) == "http://h:2/v1"
    assert entry_base_url(e({"host": "http://h:3"}), **kw) == "http://h:3/v1"
    assert entry_base_url(e({}), **kw) is None


def test_a_streamed_call_announced_with_null_arguments_starts_them_empty(make_config):
    stage = ToolCallSynthesis(None, make_config())  # type: ignore[arg-type]
    ctx = _ctx({"messages": []})
    first = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "x",
                            "type": "function",
                            "function": {"name": "f", "arguments": None},
                        }
                    ]
                },
            }
        ]
    }
    rest = {
        "choices": [
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}}
        ]
    }
    out = [c for chunk in (first, rest) for c in stage.chunk(ctx, chunk)]
    args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in out)
    assert args == '{"a": 1}'


def test_an_oversized_chunk_is_split_with_finish_and_usage_on_its_last_piece():
    import orjson

    from imageworks_proxy.http.sse import MAX_LINE, encode_event

    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "usage": usage,
        "choices": [{"index": 0, "delta": {"content": "\n" * 40_000}, "finish_reason": "stop"}],
    }
    lines = [line for line in encode_event(chunk).split(b"\n\n") if line]
    assert len(lines) > 1 and all(len(line) <= MAX_LINE for line in lines)
    events = [orjson.loads(line[6:]) for line in lines]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "\n" * 40_000
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * (len(events) - 1) + ["stop"]
    assert [e.get("usage") for e in events] == [None] * (len(events) - 1) + [usage]


def test_json_content_stays_text_when_the_request_forbade_tool_calls(make_config):
    stage = ToolCallSynthesis(None, make_config())  # type: ignore[arg-type]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    content = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

    def reply(**body):
        completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        return stage.response(_ctx({"messages": [], "tools": tools, **body}), completion)["choices"][0]

    assert reply()["finish_reason"] == "tool_calls"
    forbidden = reply(tool_choice="none")
    assert forbidden["message"]["content"] == content and "tool_calls" not in forbidden["message"]
