"""Does a vLLM model have a chat template? Found, not found, or cannot be known here (a Hugging Face hub
id that vLLM will download, with no copy in the local HF cache)."""

from __future__ import annotations

import os

import orjson

from imageworks_proxy.catalogue.registry import Entry


def hub_snapshot_dir(repo_id: str) -> str | None:
    """The newest local snapshot of a Hugging Face hub id (``org/name``) in the HF cache, if any."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    snapshots = os.path.join(cache, "models--" + repo_id.replace("/", "--"), "snapshots")
    try:
        candidates = [os.path.join(snapshots, d) for d in os.listdir(snapshots)]
    except OSError:
        return None
    candidates = [d for d in candidates if os.path.isdir(d)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def model_dir(entry: Entry) -> str | None:
    for path in (entry.download_path, entry.backend_config.model_path):
        if path and os.path.isdir(os.path.expanduser(path)):
            return os.path.expanduser(path)
    path = entry.backend_config.model_path or entry.download_path
    return hub_snapshot_dir(path) if path else None


def find_chat_template(entry: Entry) -> str | None:
    """Where the template comes from: the explicit ``chat_template.path``, or a file in the model
    directory (``chat_template.jinja``, ``chat_template.json``, or ``chat_template`` inside
    ``tokenizer_config.json``). ``None`` when there is none."""
    if entry.chat_template_path:
        path = os.path.expanduser(entry.chat_template_path)
        return path if os.path.isfile(path) else None
    directory = model_dir(entry)
    if directory is None:
        return None
    for name in ("chat_template.jinja", "chat_template.json"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    tok = os.path.join(directory, "tokenizer_config.json")
    try:
        with open(tok, "rb") as fh:
            data = orjson.loads(fh.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    if isinstance(data, dict) and data.get("chat_template"):
        return tok
    return None


def hub_id_not_cached(entry: Entry) -> bool:
    """Whether vLLM will fetch ``entry``'s model from the Hugging Face hub and no copy is in the local HF
    cache: then whether it has a chat template is only known once vLLM has it (vLLM reports it)."""
    if entry.chat_template_path:
        return False
    path = entry.backend_config.model_path or entry.download_path
    if not path or os.path.exists(os.path.expanduser(path)):
        return False
    if path.count("/") != 1 or path.startswith(("/", ".", "~")):
        return False
    return hub_snapshot_dir(path) is None


def has_chat_template(entry: Entry) -> bool | None:
    """``True``/``False`` from the files, ``None`` when it cannot be known here (:func:`hub_id_not_cached`).

    Reads files: call it off the event loop."""
    if find_chat_template(entry) is not None:
        return True
    return None if hub_id_not_cached(entry) else False
