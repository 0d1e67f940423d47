"""``POST /v1/completions``: legacy text completions, streamed or not, as editors use them for
autocomplete (docs/api.md#text-completions).

The same path as chat (request id, body parsing, model resolution, GPU tenancy, SSE, request log and
metrics), with the text-completion stages and the adapter's ``completions`` method.
"""

from __future__ import annotations

from aiohttp import web

from imageworks_proxy.adapters.base import COMPLETIONS
from imageworks_proxy.http.views.chat import serve


async def completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, COMPLETIONS)
