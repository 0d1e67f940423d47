"""The parser names vLLM 0.33 accepts, for the registry's ``backend_config.tool_call_parser`` and
``backend_config.reasoning_parser`` (docs/registry.md).

vLLM refuses to start with a name it does not know ("invalid tool call parser: ...") unless a plugin
(``--tool-parser-plugin`` / ``--reasoning-parser-plugin`` in ``extra_args``) registers it, so a registry
load warns about such a name instead of letting the first chat wait for a start that fails.
"""

from __future__ import annotations

import difflib

from imageworks_proxy.catalogue.entry import Entry

#: ``--tool-call-parser`` names registered by vLLM 0.33.0 (``vllm/tool_parsers/__init__.py``).
TOOL_CALL_PARSERS = frozenset(
    {
        "apertus", "beam", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31",
        "deepseek_v32", "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4",
        "gigachat3", "glm45", "glm47", "granite", "granite-20b-fc", "granite4", "hermes", "hf",
        "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba", "k2_horizon", "kimi_k2",
        "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json", "llama4_pythonic", "longcat", "mimo",
        "minicpm5", "minimax_m2", "minimax_m3", "mistral", "muse", "muse_glimmer", "musespark1x", "olmo3",
        "openai", "phi4_mini_json", "plamo3", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json",
        "qwen3_xml", "seed_oss", "step3", "step3p5", "step5", "xlam"
    }
)

#: ``--reasoning-parser`` names registered by vLLM 0.33.0 (``vllm/reasoning/__init__.py``); ``none``
#: means no parser.
REASONING_PARSERS = frozenset(
    {
        "beam", "cohere_command3", "cohere_command4", "deepseek_r1", "deepseek_v3", "deepseek_v4",
        "deepseek_v41", "ernie45", "gemma4", "glm45", "glm47", "granite", "granite_thinking_parser", "hf",
        "holo2", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "k2_horizon", "kimi_k2", "kimi_k3", "ling3",
        "mimo", "minicpmv", "minimax_m2", "minimax_m2_append_think", "minimax_m3", "mistral", "muse",
        "muse_glimmer", "musespark1x", "nemotron_v3", "olmo3", "openai_gptoss", "plamo3", "poolside_v1",
        "qwen3", "seed_oss", "step3", "step3p5", "step5"
    }
)

_CHECKS = (
    ("tool_call_parser", TOOL_CALL_PARSERS, "--tool-parser-plugin", "a tool-call parser"),
    ("reasoning_parser", REASONING_PARSERS, "--reasoning-parser-plugin", "a reasoning parser"),
)


def parser_warnings(entry: Entry) -> list[str]:
    """Warnings for parser names in a ``vllm`` entry that vLLM 0.33 does not know (``[]`` when fine)."""
    if entry.backend != "vllm":
        return []
    out = []
    for field, known, plugin_flag, what in _CHECKS:
        name = getattr(entry.backend_config, field)
        if not name or name in known or (field == "reasoning_parser" and name.lower() == "none"):
            continue
        if any(a == plugin_flag or a.startswith(plugin_flag + "=") for a in entry.backend_config.extra_args):
            continue  # a plugin may register it
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(
            f"entry {entry.name!r}: backend_config.{field}: {name!r} is not {what} vLLM 0.33 knows{hint}; "
            "vLLM will refuse to start"
        )
    return out
