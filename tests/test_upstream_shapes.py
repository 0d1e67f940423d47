"""Property tests: whatever JSON an upstream sends, the reply stages either turn it into a completion or
chunks that validate against the OpenAI schemas, or refuse it as the backend's fault (502
``backend_error``) — never any other exception (which a client would see as a 500 ``internal_error``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageworks_proxy import keys
from imageworks_proxy.adapters.ollama.response import ChunkTranslator, completion_from_ollama
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.pipeline.stage import ChatContext
from tests.openai_schemas import validate_chunk, validate_completion

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=8)
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def often(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(good, good, good, anything)


def fields(**values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with any subset of these fields."""
    return st.fixed_dictionaries({}, optional={k: often(v) for k, v in values.items()})


text = st.text(max_size=20) | st.sampled_from(
    ['{"name": "get_weather", "arguments": {}}', "```json\n{", "[{"]
)
function = fields(
    name=st.sampled_from(["get_weather", "other", ""]), arguments=st.text(max_size=10) | st.just({})
)
tool_call = fields(
    index=st.integers(0, 2), id=st.text(max_size=5), type=st.just("function"), function=function
)
message = fields(
    role=st.just("assistant"),
    content=text,
    reasoning=text,
    reasoning_content=text,
    refusal=st.none(),
    tool_calls=st.lists(tool_call, max_size=2),
    function_call=function,
)
finish = st.sampled_from([None, "stop", "length", "tool_calls", "function_call", "eos", "weird"])
usage = fields(
    prompt_tokens=st.integers(0, 9), completion_tokens=st.integers(0, 9), total_tokens=st.integers(0, 9)
)
completion = fields(
    id=st.text(max_size=5),
    created=st.integers(0, 2**31),
    model=st.text(max_size=5),
    choices=st.lists(
        fields(index=st.integers(0, 2), message=message, finish_reason=finish, logprobs=st.none()), max_size=2
    ),
    usage=usage,
)
chunk = fields(
    id=st.text(max_size=5),
    created=st.integers(0, 2**31),
    choices=st.lists(fields(index=st.integers(0, 2), delta=message, finish_reason=finish), max_size=2),
    usage=usage,
)


@pytest.fixture
def pipeline_ctx(registry_file, make_config, make_app):
    registry_file([])
    app = make_app(make_config())
    pipeline = keys.pipeline(app)

    def new_ctx(stream: bool, tools: bool) -> ChatContext:
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        if tools:
            body["tools"] = TOOLS
        return ChatContext(
            request_id="req_1", body=body, app=app, stream=stream, model="m", client_wants_usage=stream
        )

    return pipeline, new_ctx


def refused_by_the_backend(exc: ProxyError) -> bool:
    return exc.status == 502 and exc.code == "backend_error"


@SETTINGS
@given(reply=st.one_of(completion, anything.filter(lambda v: isinstance(v, dict))), tools=st.booleans())
def test_any_completion_becomes_a_valid_one_or_a_502(pipeline_ctx, reply, tools):
    pipeline, new_ctx = pipeline_ctx
    try:
        out = pipeline.run_response(new_ctx(False, tools), reply)
    except ProxyError as exc:
        assert refused_by_the_backend(exc), exc
        return
    validate_completion(out)


@SETTINGS
@given(
    chunks=st.lists(
        st.one_of(chunk, chunk, st.dictionaries(st.text(max_size=6), anything, max_size=3)), max_size=5
    ),
    tools=st.booleans(),
)
def test_any_stream_becomes_valid_chunks_or_a_502(pipeline_ctx, chunks, tools):
    pipeline, new_ctx = pipeline_ctx
    ctx = new_ctx(True, tools)
    out: list[dict[str, Any]] = []
    try:
        for c in chunks:
            out.extend(pipeline.run_chunk(ctx, c))
        out.extend(pipeline.run_stream_end(ctx))
    except ProxyError as exc:
        assert refused_by_the_backend(exc), exc
    for c in out:
        validate_chunk(c)


ollama_message = fields(
    role=st.just("assistant"),
    content=st.text(max_size=10),
    thinking=st.text(max_size=10),
    tool_calls=st.lists(
        fields(
            id=st.text(max_size=5),
            function=fields(
                name=st.text(max_size=5), arguments=st.dictionaries(st.text(max_size=3), scalars, max_size=2)
            ),
        ),
        max_size=2,
    ),
)
ollama_line = fields(
    model=st.text(max_size=5),
    message=ollama_message,
    done=st.booleans(),
    done_reason=st.sampled_from(["stop", "length", "load"]),
    prompt_eval_count=st.integers(0, 50),
    eval_count=st.integers(0, 50),
)


@SETTINGS
@given(line=st.one_of(ollama_line, anything.filter(lambda v: isinstance(v, dict))))
def test_any_ollama_reply_becomes_a_valid_completion_or_a_502(line):
    try:
        out = completion_from_ollama(line, model="m")
    except ProxyError as exc:
        assert refused_by_the_backend(exc), exc
        return
    validate_completion(out)


@SETTINGS
@given(lines=st.lists(st.one_of(ollama_line, anything), max_size=5))
def test_any_ollama_stream_becomes_valid_chunks_or_a_502(lines):
    translator = ChunkTranslator(model="m", include_usage=True)
    try:
        for line in lines:
            for out in translator.feed(line):
                validate_chunk(out)
    except ProxyError as exc:
        assert refused_by_the_backend(exc), exc
