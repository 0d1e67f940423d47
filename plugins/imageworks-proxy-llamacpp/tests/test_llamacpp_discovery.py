"""Installing the distribution is what turns the plugin on: its entry point is found by the proxy, and
without the distribution the ``gguf`` entries are not served by it."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import imageworks_proxy

DIST = "imageworks-proxy-llamacpp"
ROUTING = """
import json
from imageworks_proxy import create_app, keys
from imageworks_proxy.http.views.info import plugin_listing
app = create_app()
models = keys.models(app)
entry = models.store.registry.by_name["tiny"]
print(json.dumps({"adapter": models.adapter_for(entry).name,
                  "plugins": {p["name"]: p["distribution"] for p in plugin_listing(app)["data"]}}))
"""


@pytest.fixture
def registry_env(tmp_path: Path) -> dict[str, str]:
    registry = tmp_path / "registry.json"
    registry.write_text(
        json.dumps([{"name": "tiny", "backend": "gguf", "backend_config": {"model_path": "/m/tiny.gguf"}}])
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(CHAT_PROXY_REGISTRY=str(registry), CHAT_PROXY_LOG_LEVEL="ERROR")
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def without_this_distribution(tmp_path: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A Python that sees every installed package except this plugin's distribution (as after
    ``pip uninstall``): site processing off, and a copy of site-packages made of links minus its files."""
    dist = md.distribution(DIST)
    site = Path(str(dist.locate_file("")))
    own_top = {Path(str(f)).parts[0] for f in dist.files or ()}
    view = tmp_path / "site-without-plugin"
    view.mkdir()
    for item in site.iterdir():
        if item.name not in own_top:
            (view / item.name).symlink_to(item)
    core_root = Path(imageworks_proxy.__file__).resolve().parent.parent
    env = dict(env, PYTHONPATH=os.pathsep.join([str(view), str(core_root)]))
    return [sys.executable, "-S"], env


def test_the_distribution_declares_its_entry_point():
    eps = [ep for ep in md.entry_points(group="imageworks_proxy") if ep.name == "llamacpp"]
    assert len(eps) == 1
    assert eps[0].value == "imageworks_proxy_llamacpp.adapter"
    assert eps[0].dist.name == DIST


def test_installed_it_is_listed_by_list_plugins_and_serves_gguf_entries(registry_env, tmp_path):
    listing = run([sys.executable, "-m", "imageworks_proxy", "--list-plugins"], registry_env, tmp_path)
    line = next(ln for ln in listing.splitlines() if ln.startswith("llamacpp "))
    assert DIST in line
    assert "adapters: llamacpp (gguf)" in listing

    routed = json.loads(run([sys.executable, "-c", ROUTING], registry_env, tmp_path))
    assert routed["adapter"] == "llamacpp"
    assert routed["plugins"]["llamacpp"] == DIST


def test_uninstalled_it_is_gone_and_gguf_entries_fall_back(registry_env, tmp_path):
    python, env = without_this_distribution(tmp_path, registry_env)
    listing = run([*python, "-m", "imageworks_proxy", "--list-plugins"], env, tmp_path)
    assert "openai-passthrough" in listing  # the proxy itself still loads its built-ins
    assert "llamacpp" not in listing

    routed = json.loads(run([*python, "-c", ROUTING], env, tmp_path))
    assert routed["adapter"] == "openai-passthrough"
    assert "llamacpp" not in routed["plugins"]
