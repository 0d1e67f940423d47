"""The template rule: an orchestrated vLLM model needs a chat template, or the request is
refused with 409 ``template_required`` before anything is started (``CHAT_PROXY_REQUIRE_TEMPLATE=1``).

vLLM itself would start (minutes) and then answer every chat request with a 400 ("default chat template
is no longer allowed"); refusing up front with the places we looked is the better experience. A Hugging
Face hub id that is not in the local HF cache cannot be checked here: vLLM downloads it with its
tokenizer config, so the request goes ahead and vLLM's own error, if any, reaches the client.
"""

from __future__ import annotations

import asyncio
import time

from imageworks_proxy import keys
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.catalogue.templates import find_chat_template, hub_id_not_cached
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.pipeline.stage import ChatContext, Stage
from imageworks_proxy.vllm.command import has_flag

_CACHE_TTL_S = 5.0


def template_source(entry: Entry) -> str | None:
    """Where the entry's chat template comes from (``--chat-template`` in ``extra_args``, the explicit
    ``chat_template.path``, or a file in the model directory / HF cache snapshot), else ``None``."""
    if has_flag(entry.backend_config.extra_args, "--chat-template"):
        return "extra_args --chat-template"
    return find_chat_template(entry)


def template_error(entry: Entry) -> ProxyError:
    where = entry.chat_template_path or "(none)"
    return ProxyError(
        409,
        "template_required",
        f"Model {entry.name!r} has no chat template, so vLLM cannot serve chat requests for it. Looked at "
        f"chat_template.path ({where}) and, in the model directory, chat_template.jinja, chat_template.json "
        "and the chat_template of tokenizer_config.json.",
        param="model",
        hint="Set chat_template.path in the registry entry (or pass --chat-template in extra_args), or set "
        "CHAT_PROXY_REQUIRE_TEMPLATE=0 to let vLLM decide.",
    )


def template_known_missing(entry: Entry) -> bool:
    """Whether ``entry`` surely has no chat template (a hub id not in the local cache is not sure)."""
    return template_source(entry) is None and not hub_id_not_cached(entry)


def check_template(entry: Entry) -> None:
    """Raise 409 ``template_required`` when ``entry`` has no chat template (synchronous file checks)."""
    if template_known_missing(entry):
        raise template_error(entry)


class TemplateStage(Stage):
    """Refuses orchestrated vLLM requests for models without a chat template (order 600)."""

    name = "template"
    order = 600

    def __init__(self, app, config) -> None:
        super().__init__(app, config)
        # logical name -> (checked at, what the check depended on, found); file checks run off the loop
        self._cache: dict[str, tuple[float, tuple[object, ...], bool]] = {}

    async def request(self, ctx: ChatContext) -> None:
        entry = ctx.entry
        if entry is None or not self.config.require_template:
            return
        try:
            adapter = keys.models(self.app).adapter_for(entry)
        except ProxyError:
            return  # no adapter: dispatch reports that
        if not adapter.requires_chat_template:
            return
        now = time.monotonic()
        bc = entry.backend_config
        depends = (bc.extra_args, entry.chat_template_path, bc.model_path, entry.download_path)
        cached = self._cache.get(entry.name)
        if cached is not None and now - cached[0] < _CACHE_TTL_S and cached[1] == depends:
            found = cached[2]
        else:
            found = not await asyncio.to_thread(template_known_missing, entry)
            self._cache[entry.name] = (now, depends, found)
        if not found:
            raise template_error(entry)
