"""Deployment files, checked without a Docker engine (none runs here): the compose file parses and wires the
OpenWebUI setup, the Dockerfiles copy files that exist and install the proxy from the repository, and the
container's command serves /v1/health when run directly."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from imageworks_proxy.config import SETTINGS
from tests.process_helpers import wait_for_json

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.openwebui.yml"
DOCKERFILES = {"cuda": DOCKER / "Dockerfile.chat-proxy", "slim": DOCKER / "Dockerfile"}
COMPOSE_FILES = {"cuda": COMPOSE, "slim": DOCKER / "docker-compose.slim.yml"}
KNOWN_SETTINGS = {s.env for s in SETTINGS}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def env_of(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instructions(dockerfile):
        if word == "ENV":
            env.update(w.split("=", 1) for w in shlex.split(args))
    return env


def dockerignore() -> list[str]:
    return [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.rstrip("/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, bare) or (
                bare.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], bare[3:])
            ):
                return True
    return False


def compose_env(service: dict) -> dict[str, str]:
    items = service["environment"]
    if isinstance(items, dict):
        return {k: "" if v is None else str(v) for k, v in items.items()}
    return dict(item.split("=", 1) for item in items)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module", params=sorted(COMPOSE_FILES))
def any_compose(request) -> tuple[str, dict]:
    """Each compose file, as (kind, parsed)."""
    return request.param, yaml.safe_load(COMPOSE_FILES[request.param].read_text())


# -- compose --------------------------------------------------------------------------------------------


def test_compose_builds_its_image_from_files_that_exist(any_compose):
    kind, compose = any_compose
    build = compose["services"]["chat-proxy"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT  # paths resolve from the compose file's folder
    assert (context / build["dockerfile"]).resolve() == DOCKERFILES[kind]


def test_compose_proxy_environment_is_the_seeds(any_compose):
    kind, compose = any_compose
    env = compose_env(compose["services"]["chat-proxy"])
    assert {
        k: env[k]
        for k in (
            "CHAT_PROXY_HOST",
            "CHAT_PROXY_PORT",
            "CHAT_PROXY_SUPPRESS_DECORATIONS",
            "CHAT_PROXY_LOOPBACK_ALIAS",
        )
    } == {
        "CHAT_PROXY_HOST": "0.0.0.0",
        "CHAT_PROXY_PORT": "8100",
        "CHAT_PROXY_SUPPRESS_DECORATIONS": "1",
        "CHAT_PROXY_LOOPBACK_ALIAS": "host.docker.internal",
    }
    # Defaults that the user may override from the shell before `docker compose up`.
    assert env["CHAT_PROXY_INCLUDE_NON_INSTALLED"] == "${CHAT_PROXY_INCLUDE_NON_INSTALLED:-0}"
    # The CUDA image starts vLLM itself unless told not to; the slim one has no vLLM to start.
    single_port = {"cuda": "${CHAT_PROXY_VLLM_SINGLE_PORT:-1}", "slim": "0"}[kind]
    assert env["CHAT_PROXY_VLLM_SINGLE_PORT"] == single_port
    unknown = {k for k in env if k.startswith("CHAT_PROXY_")} - KNOWN_SETTINGS
    assert not unknown, f"compose sets variables the proxy does not know: {unknown}"


def test_compose_lets_openwebui_call_the_proxy_by_its_service_name(any_compose):
    """OpenWebUI sends ``Host: chat-proxy:8100``; the proxy answers only names it was told about."""
    from imageworks_proxy.config import load_config
    from imageworks_proxy.http.guards import HostPolicy

    _kind, compose = any_compose
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v)
           for k, v in compose_env(compose["services"]["chat-proxy"]).items() if k.startswith("CHAT_PROXY_")}
    hosts = HostPolicy.from_config(load_config(env))
    assert hosts.allows("chat-proxy:8100")
    assert hosts.allows("127.0.0.1:8100")  # the healthcheck, and the published port on the host
    assert not hosts.allows("evil.example:8100")


def test_only_the_cuda_compose_reserves_the_gpu(any_compose):
    kind, compose = any_compose
    proxy = compose["services"]["chat-proxy"]
    if kind == "slim":
        assert "deploy" not in proxy and "ipc" not in proxy
        return
    devices = proxy["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices


def test_compose_gives_the_proxy_the_host_the_weights_and_a_state_volume(any_compose):
    _kind, compose = any_compose
    proxy = compose["services"]["chat-proxy"]
    assert "host.docker.internal:host-gateway" in proxy["extra_hosts"]
    binds = [v for v in proxy["volumes"] if isinstance(v, dict) and v["type"] == "bind"]
    weights = next(v for v in binds if "IMAGEWORKS_WEIGHTS_DIR" in v["source"])
    assert weights["source"] == weights["target"] and weights["read_only"] is True
    registry = next(v for v in binds if "IMAGEWORKS_REGISTRY_DIR" in v["source"])
    assert registry["read_only"] is True
    assert registry["target"] == compose_env(proxy)["CHAT_PROXY_REGISTRY"]
    assert proxy["ports"] == ["127.0.0.1:8100:8100"]  # published on the host's loopback only
    # The state folder (remembered model ids, the vLLM state file) outlives the container.
    volumes = {v["target"]: v for v in proxy["volumes"] if isinstance(v, dict)}
    assert volumes["/srv/imageworks/_staging"]["type"] == "volume"


def test_compose_healthcheck_asks_the_proxys_health_route(any_compose):
    kind, compose = any_compose
    test = compose["services"]["chat-proxy"]["healthcheck"]["test"]
    assert test[0] == "CMD" and any("http://127.0.0.1:8100/v1/health" in word for word in test)
    # The slim image (python:3.12-slim) has no curl.
    assert test[1] == {"cuda": "curl", "slim": "python"}[kind]


def test_openwebui_waits_for_a_healthy_proxy_and_uses_it_as_its_only_backend(any_compose):
    _kind, compose = any_compose
    webui = compose["services"]["openwebui"]
    assert webui["depends_on"] == {"chat-proxy": {"condition": "service_healthy"}}
    env = compose_env(webui)
    assert env["OPENAI_API_BASE_URL"] == "http://chat-proxy:8100/v1"
    assert env["ENABLE_OLLAMA_API"] == "false"
    assert env["OLLAMA_BASE_URLS"] == "" and env["OLLAMA_API_CONFIGS"] == ""
    # Applied on the first start only: what the user changes in OpenWebUI later is kept across restarts.
    assert "RESET_CONFIG_ON_START" not in env
    # OpenWebUI needs some key: EMPTY unless keys are set
    assert env["OPENAI_API_KEY"] == "${CHAT_PROXY_API_KEYS:-EMPTY}"


def test_every_compose_command_in_the_docs_names_its_file():
    """Run from the repository root, `docker compose up` finds no compose file: each command says which."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            for command in re.findall(r"docker compose[^`|;&]*", line):
                if command.strip() in ("docker compose",):
                    continue  # the tool's name in prose
                assert re.search(r"-f docker/docker-compose\.(openwebui|slim)\.yml", command), (
                    f"{doc.name}: {command!r}"
                )


# -- Dockerfiles ----------------------------------------------------------------------------------------


def test_cuda_image_base_python_and_vllm():
    steps = instructions(DOCKERFILES["cuda"])
    base = next(args for word, args in steps if word == "FROM")
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-runtime-ubuntu22\.04", base)
    python = next(
        args.split("=", 1)[1] for word, args in steps if word == "ARG" and args.startswith("PYTHON=")
    )
    assert tuple(int(x) for x in python.removeprefix("python").split(".")) >= (3, 11)
    vllm = next(
        args.split("=", 1)[1].strip('"')
        for word, args in steps
        if word == "ARG" and args.startswith("VLLM_SPEC=")
    )
    assert vllm.startswith("vllm[vision]")
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert 'pip install "${VLLM_SPEC}"' in runs


def test_slim_image_is_python_only_and_sends_vllm_entries_to_external_servers():
    steps = instructions(DOCKERFILES["slim"])
    assert next(args for word, args in steps if word == "FROM") == "python:3.12-slim"
    assert "vllm" not in " ".join(args for word, args in steps if word == "RUN")
    assert env_of(DOCKERFILES["slim"])["CHAT_PROXY_VLLM_SINGLE_PORT"] == "0"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_the_proxy_from_the_repository(kind):
    dockerfile = DOCKERFILES[kind]
    steps = instructions(dockerfile)
    patterns = dockerignore()
    copied = []
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), (
                    f"{dockerfile.name}: COPY {src} does not exist in the repository"
                )
                assert not ignored(src, patterns), (
                    f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"
                )
                copied.append(src)
    assert {"pyproject.toml", "README.md", "imageworks_proxy"} <= set(copied)
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert 'pip install ".[speedups]"' in runs
    speedups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "speedups" in speedups


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runs_the_proxy_as_a_non_root_user_on_8100_with_a_healthcheck(kind):
    steps = instructions(DOCKERFILES[kind])
    words = [w for w, _ in steps]
    user = [args for word, args in steps if word == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert words.index("USER") < words.index("CMD")
    assert ("EXPOSE", "8100") in steps
    env = env_of(DOCKERFILES[kind])
    assert env["CHAT_PROXY_HOST"] == "0.0.0.0" and env["CHAT_PROXY_PORT"] == "8100"
    assert not {k for k in env if k.startswith("CHAT_PROXY_")} - KNOWN_SETTINGS
    healthcheck = next(args for word, args in steps if word == "HEALTHCHECK")
    assert "/v1/health" in healthcheck
    cmd = json.loads(next(args for word, args in steps if word == "CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd == ["imageworks-chat-proxy"] and cmd[0] in scripts


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = dockerignore()
    for path in (
        ".git",
        ".venv",
        "logs/chat_proxy.jsonl",
        "_staging/active_vllm.json",
        "imageworks_proxy/__pycache__/x.pyc",
        "plugins/imageworks-proxy-llamacpp/tests/test_x.py",
    ):
        assert ignored(path, patterns), path
    for path in (
        "pyproject.toml",
        "imageworks_proxy/app.py",
        "plugins/imageworks-proxy-llamacpp/pyproject.toml",
    ):
        assert not ignored(path, patterns), path


# -- the container's command, run directly ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _healthcheck_shell(kind: str) -> str:
    args = next(a for w, a in instructions(DOCKERFILES[kind]) if w == "HEALTHCHECK")
    return args.split(" CMD ", 1)[1]


def test_container_command_serves_health_on_all_interfaces_and_passes_the_image_healthchecks(tmp_path):
    """What `docker run` does: imageworks-chat-proxy with the image's environment
    (CHAT_PROXY_HOST=0.0.0.0)."""
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    registry = tmp_path / "configs"
    registry.mkdir()
    (registry / "model_registry.json").write_text((ROOT / "examples" / "registry.json").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(env_of(DOCKERFILES["slim"]))
    env.update(CHAT_PROXY_PORT=str(port), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    # Relative defaults (configs/, logs/, _staging/) resolve in the working directory, as under
    # /srv/imageworks.
    proc = subprocess.Popen(
        ["imageworks-chat-proxy"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health = wait_for_json(proc, f"http://127.0.0.1:{port}/v1/health")
        assert health["status"] == "ok"
        assert health["registry"]["models"] == 5 and health["registry"]["error"] is None
        for kind in sorted(DOCKERFILES):
            if kind == "cuda" and not any((Path(d) / "curl").exists() for d in env["PATH"].split(os.pathsep)):
                continue  # the CUDA image installs curl; this machine may not have it
            check = subprocess.run(
                ["sh", "-c", _healthcheck_shell(kind)], env=env, capture_output=True, timeout=30
            )
            assert check.returncode == 0, (kind, check.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the proxy did not stop on SIGTERM") from None
    assert proc.returncode == 0, err
    assert "without API keys" in err  # bound beyond loopback with no keys: the loud warning
    # The healthchecks fail when nothing answers.
    check = subprocess.run(["sh", "-c", _healthcheck_shell("slim")], env=env, capture_output=True, timeout=30)
    assert check.returncode != 0
