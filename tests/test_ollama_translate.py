"""OpenAI <-> Ollama native translation, without HTTP (adapters/ollama/request.py and response.py)."""

from __future__ import annotations

import json

import pytest

from imageworks_proxy.adapters.ollama.request import (
    image_urls,
    keep_alive_value,
    parse_num_ctx,
    to_ollama_request,
)
from imageworks_proxy.adapters.ollama.response import ChunkTranslator, completion_from_ollama
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.upstream.errors import json_error_message as error_from_body
from imageworks_proxy.upstream.ndjson import NdjsonSplitter, decode_line
from tests.openai_schemas import validate_chunk, validate_completion

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def translate(body, **kw):
    kw.setdefault("model", "llama3.2:latest")
    kw.setdefault("stream", False)
    return to_ollama_request(body, **kw)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--num-ctx", "8192"], 8192),
        (["--foo", "1", "--num-ctx=16384"], 16384),
        (["--num_ctx", "4096"], 4096),
        (["--num-ctx", "lots"], None),
        (["--num-ctx"], None),
        ([], None),
    ],
)
def test_num_ctx_comes_from_extra_args(args, expected):
    assert parse_num_ctx(args) == expected


@pytest.mark.parametrize(
    ("raw", "expected"), [("10m", "10m"), ("-1", -1), ("0", 0), ("3600", 3600), ("", None), (None, None)]
)
def test_keep_alive_numbers_are_sent_as_numbers(raw, expected):
    assert keep_alive_value(raw) == expected


def test_sampling_options_map_onto_ollama_options():
    payload = translate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 30,
            "seed": 7,
            "stop": "END",
            "max_tokens": 99,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.25,
        },
        num_ctx=8192,
        keep_alive="10m",
    )
    assert payload["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 30,
        "seed": 7,
        "stop": ["END"],
        "num_predict": 99,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.25,
        "num_ctx": 8192,
    }
    assert payload["keep_alive"] == "10m"
    assert payload["stream"] is False and payload["model"] == "llama3.2:latest"


def test_max_completion_tokens_wins_and_request_num_ctx_overrides_registry():
    payload = translate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "num_ctx": 2048,
            "repeat_penalty": 1.1,
            "stop": ["a", "b"],
        },
        num_ctx=8192,
    )
    assert payload["options"]["num_predict"] == 20
    assert payload["options"]["num_ctx"] == 2048
    assert payload["options"]["repeat_penalty"] == 1.1
    assert payload["options"]["stop"] == ["a", "b"]
    assert "keep_alive" not in payload  # nothing configured: Ollama's own default applies


def test_response_format_becomes_format():
    msgs = [{"role": "user", "content": "x"}]
    assert translate({"messages": msgs, "response_format": {"type": "json_object"}})["format"] == "json"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = translate(
        {
            "messages": msgs,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        }
    )
    assert fmt["format"] == schema
    assert "format" not in translate({"messages": msgs, "response_format": {"type": "text"}})


def test_reasoning_controls_become_think():
    msgs = [{"role": "user", "content": "x"}]
    assert translate({"messages": msgs, "reasoning_effort": "high"})["think"] == "high"
    assert translate({"messages": msgs, "reasoning_effort": "none"})["think"] is False
    assert translate({"messages": msgs, "think": True})["think"] is True
    assert translate({"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}})["think"] is False
    assert "think" not in translate({"messages": msgs})


@pytest.mark.parametrize(
    ("effort", "think"),
    [("minimal", "low"), ("low", "low"), ("medium", "medium"), ("high", "high"), ("xhigh", "max"),
     ("max", "max")],
)
def test_every_reasoning_effort_becomes_a_think_value_ollama_takes(effort, think):
    # Ollama accepts true/false and "low", "medium", "high", "max"; any other string is a 400
    msgs = [{"role": "user", "content": "hi"}]
    assert translate({"messages": msgs, "reasoning_effort": effort})["think"] == think
    assert translate({"messages": msgs, "think": effort})["think"] == think


def test_messages_text_parts_joined_images_stripped_developer_is_system():
    payload = translate(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                        {"type": "text", "text": "in these?"},
                        {"type": "image_url", "image_url": "https://example.test/cat.jpg"},
                        {"type": "file", "file": {"filename": "a.pdf"}},
                    ],
                },
            ]
        },
        fetched={"https://example.test/cat.jpg": "Q0FU"},
    )
    assert payload["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is\nin these?", "images": [PNG_B64, "Q0FU"]},
    ]


def test_image_urls_lists_each_http_url_once():
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "http://a.test/1.png"}},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                    {"type": "image_url", "image_url": {"url": "http://a.test/1.png"}},
                ],
            },
            {"role": "user", "content": [{"type": "image_url", "image_url": "https://b.test/2.png"}]},
        ]
    }
    assert image_urls(body) == ["http://a.test/1.png", "https://b.test/2.png"]


def test_non_base64_data_url_is_invalid_image():
    with pytest.raises(ProxyError) as err:
        translate(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/svg+xml,<svg/>"}}],
                    }
                ]
            }
        )
    assert (err.value.status, err.value.code) == (400, "invalid_image")


def test_tool_round_trip_messages_carry_objects_and_tool_names():
    payload = translate(
        {
            "messages": [
                {"role": "user", "content": "time in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
                        },
                        {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "done"}]},
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
            ],
        }
    )
    assistant, tool1, tool2 = payload["messages"][1:]
    assert assistant == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "function": {"index": 0, "name": "get_time", "arguments": {"tz": "Europe/Paris"}},
            },
            {"id": "call_2", "function": {"index": 1, "name": "noop", "arguments": {}}},
        ],
    }
    assert tool1 == {"role": "tool", "content": "12:00", "tool_call_id": "call_1", "tool_name": "get_time"}
    assert tool2["tool_name"] == "noop" and tool2["content"] == "done"
    assert payload["tools"] == [
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ]


def test_tool_choice_none_sends_no_tools_and_bad_arguments_are_400():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert "tools" not in translate(
        {"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": "none"}
    )
    two = [*tools, {"type": "function", "function": {"name": "g"}}]
    named = translate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": two,
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        }
    )
    assert named["tools"] == [{"type": "function", "function": {"name": "g"}}]
    with pytest.raises(ProxyError) as err:
        translate(
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}
                        ],
                    }
                ]
            }
        )
    assert (err.value.status, err.value.code) == (400, "invalid_request")


def test_non_streamed_reply_becomes_a_valid_completion():
    completion = completion_from_ollama(
        {
            "model": "llama3.2:latest",
            "message": {"role": "assistant", "content": "Hi!", "thinking": "hmm"},
            "done": True,
            "done_reason": "length",
            "prompt_eval_count": 12,
            "eval_count": 3,
        },
        model="llama3.2 3b",
    )
    validate_completion(completion)
    assert completion["model"] == "llama3.2 3b"
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["choices"][0]["message"]["reasoning_content"] == "hmm"
    assert completion["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def test_tool_calls_get_ids_and_json_string_arguments():
    completion = completion_from_ollama(
        {
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "a", "arguments": {"x": [1, "é"]}}},
                    {"id": "call_kept", "function": {"name": "b", "arguments": {}}},
                ],
            },
            "done": True,
            "done_reason": "stop",
        },
        model="m",
    )
    validate_completion(completion)
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    first, second = choice["message"]["tool_calls"]
    assert first["id"].startswith("call_") and len(first["id"]) > 10
    assert json.loads(first["function"]["arguments"]) == {"x": [1, "é"]}
    assert second["id"] == "call_kept" and second["function"]["arguments"] == "{}"
    assert completion["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _line(content="", **kw):
    return {"model": "t", "message": {"role": "assistant", "content": content, **kw}, "done": False}


def test_stream_lines_become_chunks_role_first_then_deltas_finish_and_usage():
    tr = ChunkTranslator(model="llama3.2 3b", include_usage=True)
    chunks = []
    for line in (
        _line(thinking="Let"),
        _line(thinking=" me"),
        _line("He"),
        _line("llo"),
        {
            "model": "t",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 5,
            "eval_count": 2,
        },
    ):
        chunks.extend(tr.feed(line))
    for c in chunks:
        validate_chunk(c)
    assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {"llama3.2 3b"}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d.get("reasoning_content") for d in deltas[1:3]] == ["Let", " me"]
    assert "".join(d.get("content", "") for d in deltas) == "Hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
    }
    assert tr.finished


def test_streamed_tool_calls_are_indexed_and_finish_with_tool_calls():
    tr = ChunkTranslator(model="m")
    chunks = tr.feed(_line(tool_calls=[{"function": {"name": "a", "arguments": {"q": 1}}}]))
    chunks += tr.feed(_line(tool_calls=[{"function": {"name": "b", "arguments": {}}}]))
    chunks += tr.feed({"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"})
    for c in chunks:
        validate_chunk(c)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(tc["index"], tc["type"], tc["function"]["name"]) for tc in calls] == [
        (0, "function", "a"),
        (1, "function", "b"),
    ]
    assert calls[0]["id"] != calls[1]["id"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"q": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"] for c in chunks)  # no usage chunk unless asked


def test_error_line_raises_backend_error():
    tr = ChunkTranslator(model="m")
    tr.feed(_line("a"))
    with pytest.raises(ProxyError) as err:
        tr.feed({"error": "CUDA error: out of memory"})
    assert err.value.status == 502 and err.value.code == "backend_error"
    assert "out of memory" in err.value.message


def test_ndjson_splitter_handles_split_and_very_long_lines():
    sp = NdjsonSplitter()
    big = "x" * 300_000  # longer than aiohttp's 128 KiB readline cap
    data = (json.dumps({"a": 1}) + "\n" + json.dumps({"b": big}) + "\n" + json.dumps({"c": 3})).encode()
    out = []
    for i in range(0, len(data), 1000):
        out += sp.feed(data[i : i + 1000])
    out += sp.close()
    assert [decode_line(line) for line in out] == [{"a": 1}, {"b": big}, {"c": 3}]
    with pytest.raises(ProxyError) as err:
        decode_line(b"not json")
    assert err.value.code == "backend_error"


def test_error_from_body_reads_ollama_errors_only():
    assert error_from_body(b'{"error":"model \'x\' not found"}') == "model 'x' not found"
    assert error_from_body(b"404 page not found") is None
    assert error_from_body(b'{"ok": true}') is None
