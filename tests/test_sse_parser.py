"""The upstream SSE parser: the same events whatever way the network splits the bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageworks_proxy.upstream.sse import MAX_PENDING, EventTooLong, SSEParser


def line_by_line(raw: bytes) -> list[bytes]:
    """What a line reader (one ``readline`` per line) makes of a whole stream: the semantics to keep."""
    events, data = [], []
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # an unfinished last line never completes an event
        if line.startswith(b"data:"):
            data.append(line[5:].strip())
        elif data and not line.strip():
            events.append(b"\n".join(data))
            data = []
    return events


def feed_in_pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    parser, out, last = SSEParser(), [], 0
    for cut in sorted(set(cuts)) + [len(raw)]:
        out += parser.feed(raw[last:cut])
        last = cut
    return out


def test_openai_style_stream_gives_each_payload_and_done():
    raw = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    assert SSEParser().feed(raw) == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


def test_crlf_comments_other_fields_and_multiline_data():
    raw = b": keep-alive\r\n\r\nevent: message\r\nid: 7\r\ndata: one\r\ndata:two\r\n\r\n"
    assert SSEParser().feed(raw) == [b"one\ntwo"]


def test_an_event_split_across_reads_waits_for_its_blank_line():
    parser = SSEParser()
    assert parser.feed(b'data: {"x"') == []
    assert parser.feed(b":1}\n") == []
    assert parser.feed(b"\n") == [b'{"x":1}']


def test_a_line_longer_than_the_cap_is_refused():
    parser = SSEParser()
    with pytest.raises(EventTooLong):
        parser.feed(b"data: " + b"x" * (MAX_PENDING + 1))


_line = st.one_of(
    st.builds(
        lambda s: b"data: " + s, st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b)
    ),
    st.sampled_from([b"", b": ping", b"event: x", b"id: 3", b"data:", b"retry: 10", b" "]),
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(_line, max_size=30),
    crlf=st.booleans(),
    tail=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=12),
)
def test_any_split_gives_what_a_line_reader_gives(lines, crlf, tail, cuts):
    sep = b"\r\n" if crlf else b"\n"
    raw = sep.join(lines) + (sep if tail else b"")
    assert feed_in_pieces(raw, [c for c in cuts if c <= len(raw)]) == line_by_line(raw)
