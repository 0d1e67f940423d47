"""Listed ids never move to another model: an id, once handed out, keeps naming its entry across registry
edits and restarts (remembered in CHAT_PROXY_NAMES_PATH); a newcomer that wants the same id gets its
logical name; only a display_name renames."""

from __future__ import annotations

import asyncio
import json
import time

from imageworks_proxy import keys
from imageworks_proxy.catalogue.naming import build_catalogue
from imageworks_proxy.catalogue.registry import parse_entry


def _qwen(name: str, **fields) -> dict:
    return {"name": name, "backend": "demo", "family": "Qwen2.5-7B-Instruct", "quantization": "awq", **fields}


QWEN = "qwen2.5-7b-instruct (AWQ)"


async def _listed(client) -> dict[str, str]:
    body = await (await client.get("/v1/models")).json()
    return {m["id"]: m["extensions"]["logical_id"] for m in body["data"]}


async def _wait_for_ids_file(path, expected: dict[str, str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            if json.loads(path.read_text())["ids"] == expected:
                return
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, path.read_text() if path.exists() else "no ids file"
        await asyncio.sleep(0.05)


async def test_a_newcomer_that_collides_with_a_listed_id_does_not_take_it_after_a_restart(
    make_config, registry_file, make_app, aiohttp_client, tmp_path
):
    config = make_config()
    registry_file([_qwen("zeta-qwen")])
    first = await aiohttp_client(make_app(config))
    assert await _listed(first) == {QWEN: "zeta-qwen"}
    await first.close()
    ids_file = tmp_path / "state" / "model_ids.json"  # next to the vLLM state file
    assert json.loads(ids_file.read_text()) == {"format": 1, "ids": {QWEN: "zeta-qwen"}}

    # A new entry for the same model family, whose logical name sorts first: before, it took the id.
    registry_file([_qwen("zeta-qwen"), _qwen("alpha-qwen")])
    second = await aiohttp_client(make_app(config))
    assert await _listed(second) == {QWEN: "zeta-qwen", "alpha-qwen": "alpha-qwen"}
    assert keys.models(second.app).resolve(QWEN).name == "zeta-qwen"
    resp = await second.post("/v1/chat/completions", json={"model": QWEN, "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert resp.status == 200 and (await resp.json())["model"] == QWEN
    await second.close()
    await _wait_for_ids_file(ids_file, {QWEN: "zeta-qwen", "alpha-qwen": "alpha-qwen"})


async def test_a_registry_edit_while_running_keeps_the_ids_too(make_config, registry_file, proxy_client):
    registry_file([_qwen("zeta-qwen")])
    client = await proxy_client(make_config())
    assert await _listed(client) == {QWEN: "zeta-qwen"}
    registry_file([_qwen("zeta-qwen"), _qwen("alpha-qwen"), {"name": "demo", "backend": "demo"}])
    deadline = time.monotonic() + 10
    while "demo" not in await _listed(client):  # the registry is polled every 0.1 s here
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await _listed(client) == {QWEN: "zeta-qwen", "alpha-qwen": "alpha-qwen", "demo": "demo"}


def _entries(*objs: dict):
    return [parse_entry(o) for o in objs]


def test_remembered_ids_hold_while_their_entry_is_there():
    remembered = {QWEN: "zeta-qwen"}
    catalogue = build_catalogue(_entries(_qwen("zeta-qwen"), _qwen("alpha-qwen")), remembered)
    assert {i.id: i.entry.name for i in catalogue.listed} == {QWEN: "zeta-qwen", "alpha-qwen": "alpha-qwen"}
    # Without the memory, the first logical name takes it (what used to happen on every edit).
    fresh = build_catalogue(_entries(_qwen("zeta-qwen"), _qwen("alpha-qwen")))
    assert {i.id: i.entry.name for i in fresh.listed} == {QWEN: "alpha-qwen", "zeta-qwen": "zeta-qwen"}


def test_display_name_renames_and_a_removed_or_deprecated_entry_gives_its_id_up():
    remembered = {QWEN: "zeta-qwen"}
    renamed = build_catalogue(_entries(_qwen("zeta-qwen", display_name="My Qwen"), _qwen("alpha-qwen")),
                              remembered)
    assert {i.id: i.entry.name for i in renamed.listed} == {"My Qwen": "zeta-qwen", QWEN: "alpha-qwen"}
    removed = build_catalogue(_entries(_qwen("alpha-qwen")), remembered)
    assert [i.id for i in removed.listed] == [QWEN]
    deprecated = build_catalogue(
        _entries(_qwen("zeta-qwen", deprecated=True), _qwen("alpha-qwen")), remembered
    )
    assert deprecated.id_of(deprecated.by_name["alpha-qwen"]) == QWEN


def test_a_remembered_id_wins_over_a_newcomers_logical_name_of_the_same_spelling():
    # A new entry whose logical name is an id already handed out: the id still names its entry, and the
    # newcomer is listed under a suffixed name.
    catalogue = build_catalogue(
        _entries({"name": "b", "backend": "demo", "family": "chat"}, {"name": "chat", "backend": "demo"}),
        {"chat": "b"},
    )
    assert catalogue.resolve("chat").name == "b"
    assert {i.id: i.entry.name for i in catalogue.listed} == {"chat": "b", "chat (2)": "chat"}
    assert catalogue.resolve("chat (2)").name == "chat"
