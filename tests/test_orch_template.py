"""The template rule stage on its own: which entries need a template and where one is found."""

from __future__ import annotations

import pytest

from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.pipeline.stage import ChatContext
from imageworks_proxy.pipeline.template import (
    TemplateStage,
    check_template,
    template_known_missing,
    template_source,
)


def vllm(tmp_path, **fields):
    d = tmp_path / "w"
    d.mkdir(exist_ok=True)
    bc = fields.pop("backend_config", {})
    return (
        parse_entry(
            {"name": "m", "backend": "vllm", "backend_config": {"model_path": str(d), **bc}, **fields}
        ),
        d,
    )


@pytest.mark.parametrize("setup", ["jinja", "json", "tokenizer", "explicit", "extra_args"])
def test_templates_are_found_where_vllm_looks(tmp_path, setup):
    entry, d = vllm(tmp_path)
    if setup == "jinja":
        (d / "chat_template.jinja").write_text("x")
    elif setup == "json":
        (d / "chat_template.json").write_text('{"chat_template": "x"}')
    elif setup == "tokenizer":
        (d / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    elif setup == "explicit":
        (tmp_path / "t.jinja").write_text("x")
        entry, _ = vllm(tmp_path, chat_template={"path": str(tmp_path / "t.jinja")})
    else:
        entry, _ = vllm(tmp_path, backend_config={"extra_args": ["--chat-template", "{{ messages }}"]})
    assert template_source(entry) is not None


def test_no_template_anywhere_and_an_explicit_path_that_does_not_exist(tmp_path):
    entry, d = vllm(tmp_path)
    (d / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    assert template_source(entry) is None
    entry, _ = vllm(tmp_path, chat_template={"path": str(tmp_path / "missing.jinja")})
    (d / "chat_template.jinja").write_text("x")
    assert template_source(entry) is None  # an explicit path wins, and it is missing


def test_a_hub_id_is_looked_up_in_the_local_hugging_face_cache(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--org--chat-7b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = parse_entry({"name": "m", "backend": "vllm", "backend_config": {"model_path": "org/chat-7b"}})
    assert template_source(entry) == str(snap / "tokenizer_config.json")
    other = parse_entry({"name": "n", "backend": "vllm", "backend_config": {"model_path": "org/base-7b"}})
    assert template_source(other) is None


async def _run(make_config, make_app, registry_file, tmp_path, entry_obj, **cfg):
    registry_file([entry_obj])
    app = make_app(make_config(INCLUDE_NON_INSTALLED="1", **cfg))
    from imageworks_proxy import keys

    stage = TemplateStage(app, keys.config(app))
    ctx = ChatContext(request_id="r", body={}, app=app)
    ctx.entry = keys.models(app).resolve(entry_obj["name"])
    await stage.request(ctx)


async def test_the_stage_refuses_only_orchestrated_vllm_entries_and_honours_the_switch(
    make_config, make_app, registry_file, tmp_path
):
    bare = {"name": "m", "backend": "vllm", "backend_config": {"model_path": str(tmp_path)}}
    with pytest.raises(ProxyError) as exc:
        await _run(make_config, make_app, registry_file, tmp_path, bare)
    assert exc.value.status == 409 and exc.value.code == "template_required"
    assert "CHAT_PROXY_REQUIRE_TEMPLATE" in exc.value.hint
    await _run(make_config, make_app, registry_file, tmp_path, bare, REQUIRE_TEMPLATE="0")
    external = {"name": "m", "backend": "vllm", "backend_config": {"base_url": "http://127.0.0.1:9/v1"}}
    await _run(make_config, make_app, registry_file, tmp_path, external)  # vllm-external: vLLM decides
    ollama = {"name": "m", "backend": "ollama", "backend_config": {"model_path": "ollama:/llama3"}}
    await _run(make_config, make_app, registry_file, tmp_path, ollama)


async def test_a_hub_id_vllm_will_download_is_left_to_vllm_unless_the_local_cache_says_no(
    make_config, make_app, registry_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = {"name": "m", "backend": "vllm", "backend_config": {"model_path": "org/chat-7b"}}
    entry = parse_entry(hub)
    assert template_source(entry) is None and not template_known_missing(entry)
    check_template(entry)  # no copy here: vLLM fetches the tokenizer config and reports a missing template
    await _run(make_config, make_app, registry_file, tmp_path, hub)
    from imageworks_proxy import keys

    app = make_app(make_config(INCLUDE_NON_INSTALLED="1"))
    listed = (await keys.models(app).listing())["data"]
    assert listed[0]["extensions"]["has_chat_template"] is None  # unknown until vLLM has it

    snap = tmp_path / "hub" / "models--org--chat-7b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    assert template_known_missing(entry)  # the cached copy has none: refused up front
    with pytest.raises(ProxyError) as exc:
        await _run(make_config, make_app, registry_file, tmp_path, hub)
    assert exc.value.code == "template_required"
