"""Does a vLLM model have a chat template? (SPEC §6.6)"""

from __future__ import annotations

import os

import orjson

from imageworks_proxy.registry import Entry


def model_dir(entry: Entry) -> str | None:
    for path in (entry.download_path, entry.backend_config.model_path):
        if path and os.path.isdir(os.path.expanduser(path)):
            return os.path.expanduser(path)
    return None


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
