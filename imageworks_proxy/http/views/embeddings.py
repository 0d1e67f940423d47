"""``POST /v1/embeddings``: vectors from the listed models that make them (docs/api.md#embeddings).

The same path as chat (request id, body parsing, model resolution, GPU tenancy, request log and metrics),
with the embeddings stages and the adapter's ``embeddings`` method; never streamed.
"""

from __future__ import annotations

from aiohttp import web

from imageworks_proxy.adapters.base import EMBEDDINGS
from imageworks_proxy.http.views.chat import serve


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await serve(request, EMBEDDINGS)
