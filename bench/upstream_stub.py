#!/usr/bin/env python3
"""A fast OpenAI-compatible upstream for overhead benchmarks.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length request bodies, pipelining) on a raw asyncio
protocol so that the stub itself is never what limits a run. Every answer is precomputed:

- ``POST .../chat/completions``: a canned ``chat.completion``; with ``"stream": true`` in the body, a
  chunked ``text/event-stream`` of one role chunk, CHUNKS content chunks, a finish chunk and ``[DONE]``,
  each event written separately as a real server would.
- ``POST .../embeddings``: a canned embeddings list holding one 768-dimension vector (the size of
  nomic-embed-text, a common RAG embedding model).
- ``GET .../models``, ``GET .../health``, ``GET /api/tags`` (Ollama tags ``bench0:latest`` …
  ``bench999:latest``, for the generated registry's Ollama entries).

Usage: ``upstream_stub.py PORT [CHUNKS]`` (CHUNKS defaults to 16).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

CREATED = 1767225600
EMBEDDING_DIMS = 768
_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _chunk_event(delta: dict, finish: str | None = None) -> bytes:
    obj = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "stub",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + _json(obj) + b"\n\n"


def _plain(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def build_answers(chunks: int) -> dict[str, bytes]:
    completion = _json(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": CREATED,
            "model": "stub",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello from the stub upstream.",
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        }
    )
    vector = [round(((i * 7919) % 2000 - 1000) / 1000 * 0.05, 8) for i in range(EMBEDDING_DIMS)]
    embeddings = _json(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": "stub-embed",
            "usage": {"prompt_tokens": 9, "total_tokens": 9},
        }
    )
    events = [_chunk_event({"role": "assistant", "content": ""})]
    events += [_chunk_event({"content": f"tok{i} "}) for i in range(chunks)]
    events += [_chunk_event({}, "stop"), b"data: [DONE]\n\n"]
    # Each event is its own HTTP chunk, so the client sees them arrive as separate writes.
    stream = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    ]
    stream += [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    stream.append(b"0\r\n\r\n")
    return {
        "completion": _plain("200 OK", completion),
        "embeddings": _plain("200 OK", embeddings),
        "models": _plain(
            "200 OK",
            _json(
                {
                    "object": "list",
                    "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "stub"}],
                }
            ),
        ),
        "health": _plain("200 OK", b"{}"),
        "tags": _plain(
            "200 OK",
            _json(
                {"models": [{"name": f"bench{i}:latest", "model": f"bench{i}:latest"} for i in range(1000)]}
            ),
        ),
        "missing": _plain(
            "404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}'
        ),
        "stream": stream,  # type: ignore[dict-item]
    }


class StubProtocol(asyncio.Protocol):
    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._one_request():
            pass

    def _one_request(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return False
        start = end + 4
        body = bytes(self.buf[start:start + length])
        del self.buf[:start + length]
        method, path = (lines[0].split(" ") + ["", ""])[:2]
        self._answer(method, path.split("?", 1)[0], body)
        return True

    def _answer(self, method: str, path: str, body: bytes) -> None:
        a = self.answers
        t = self.transport
        assert t is not None
        if method == "POST" and path.endswith("/chat/completions"):
            if _STREAM_FLAG.search(body):
                for piece in a["stream"]:
                    t.write(piece)
            else:
                t.write(a["completion"])
        elif method == "POST" and path.endswith("/embeddings"):
            t.write(a["embeddings"])
        elif method == "GET" and path.endswith("/models"):
            t.write(a["models"])
        elif method == "GET" and path.endswith("/health"):
            t.write(a["health"])
        elif method == "GET" and path == "/api/tags":
            t.write(a["tags"])
        else:
            t.write(a["missing"])


async def serve(port: int, chunks: int) -> None:
    answers = build_answers(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(answers), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    port = int(argv[1])
    chunks = int(argv[2]) if len(argv) > 2 else 16
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(port, chunks))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv)
