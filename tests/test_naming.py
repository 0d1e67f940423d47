"""Public model ids and resolution, through the pure functions and through /v1/models."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageworks_proxy.catalogue.naming import build_catalogue, normalise, quant_label, simplified_name
from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.errors import ProxyError


def entry(**fields):
    fields.setdefault("name", "x")
    fields.setdefault("backend", "vllm")
    return parse_entry(fields)


# -- the documented examples, exactly ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"backend": "ollama", "quantization": "q4_k_m",
          "metadata": {"ollama_family": "llama", "ollama_parameter_size": "12.2B"}}, "llama 12.2b (Q4 K M)"),
        ({"family": "Qwen2.5-VL-7B-Instruct-AWQ", "quantization": "awq"}, "qwen2.5-vl-7b-instruct (AWQ)"),
        ({"family": "gpt-oss-20b", "quantization": "mxfp4"}, "gpt-oss-20b (MXFP4)"),
        ({"family": "florence-2-large", "quantization": "unknown"}, "florence-2-large"),
        ({"backend": "ollama", "quantization": "f16",
          "metadata": {"ollama_family": "gpt-oss-abliterated-20b"}}, "gpt-oss-abliterated 20b (F16)"),
    ],
    ids=["ollama-llama", "vllm-qwen-awq", "vllm-gpt-oss", "florence-unknown-quant", "ollama-trailing-size"],
)
def test_documented_examples_get_these_names(fields, expected):
    assert simplified_name(entry(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # display_name wins as it is
        ({"display_name": "My Fancy Model", "family": "whatever", "quantization": "awq"}, "My Fancy Model"),
        # family from the last path component, quant tokens and format words dropped whole
        (
            {
                "backend_config": {"model_path": "/weights/Llama-3-8B-Instruct-Q4_K_M.gguf"},
                "quantization": "Q4_K_M",
            },
            "llama-3-8b-instruct (Q4 K M)",
        ),
        ({"download_path": "/w/mistral-7b-instruct-v0.2.Q5_K_M.gguf/"}, "mistral-7b-instruct-v0.2"),
        (
            {"family": "Qwen2.5-7B-Instruct-GPTQ-Int4", "quantization": "gptq-int4"},
            "qwen2.5-7b-instruct (GPTQ INT4)",
        ),
        ({"family": "org/model_name@fp16"}, "org-model-name"),
        # ollama: metadata family first, then family; size from metadata
        (
            {"backend": "ollama", "family": "qwen3", "metadata": {"ollama_parameter_size": "8.2B"}},
            "qwen3 8.2b",
        ),
        # a size already in the family is not repeated
        (
            {
                "backend": "ollama",
                "metadata": {"ollama_family": "phi3-3.8b", "ollama_parameter_size": "3.8B"},
            },
            "phi3-3.8b",
        ),
        # no family anywhere: the logical name
        ({"name": "Plain_Name"}, "plain-name"),
        # quant label not repeated when the name already ends with it
        ({"display_name": None, "family": "model", "quantization": "none"}, "model"),
    ],
)
def test_more_names(fields, expected):
    assert simplified_name(entry(**fields)) == expected


def test_quant_label():
    assert quant_label("q4_k_m") == "Q4 K M"
    assert quant_label("gptq-int4") == "GPTQ INT4"
    assert quant_label("unknown") is None and quant_label("") is None and quant_label(None) is None


# -- collisions and de-duplication ---------------------------------------------------------------------


def test_collision_later_entry_is_listed_under_its_logical_name():
    cat = build_catalogue(
        [
            entry(name="b-model", family="llama-3-8b", quantization="awq"),
            entry(name="a-model", family="llama-3-8b", quantization="awq"),
        ]
    )
    assert [(i.id, i.entry.name) for i in cat.listed] == [
        ("llama-3-8b (AWQ)", "a-model"),
        ("b-model", "b-model"),
    ]
    assert cat.resolve("llama-3-8b (AWQ)").name == "a-model"
    assert cat.resolve("b-model").name == "b-model"


def test_deprecated_twin_never_takes_the_clean_name():
    cat = build_catalogue(
        [
            entry(name="a-old", family="llama-3-8b", deprecated=True),
            entry(name="b-new", family="llama-3-8b"),
        ]
    )
    assert cat.id_of(cat.by_name["b-new"]) == "llama-3-8b"
    assert cat.id_of(cat.by_name["a-old"]) == "a-old"
    assert cat.resolve("a-old").name == "a-old"


def test_id_equal_to_another_entrys_logical_name_falls_back():
    # "b" would be listed for entry "a", but "b" is entry b's logical name, which resolves first.
    cat = build_catalogue([entry(name="a", display_name="b"), entry(name="b", family="other")])
    ids = {i.entry.name: i.id for i in cat.listed}
    assert ids == {"a": "a", "b": "other"}
    assert cat.resolve("b").name == "b"


def test_ollama_entries_for_the_same_tag_are_listed_once():
    cat = build_catalogue(
        [
            entry(
                name="llama-a",
                backend="ollama",
                served_model_id="llama3:8b",
                metadata={"ollama_family": "llama"},
            ),
            entry(name="llama-b", backend="ollama", backend_config={"model_path": "ollama:/llama3:8b"}),
            entry(name="llama-c", backend="ollama", served_model_id="llama3"),
            entry(name="llama-d", backend="ollama", served_model_id="llama3:latest"),
        ]
    )
    assert [i.entry.name for i in cat.listed] == ["llama-a", "llama-c"]
    # requests by tag resolve to the listed entry, not an ambiguity error
    assert cat.resolve("llama3:8b").name == "llama-a"
    assert cat.resolve("llama-b").name == "llama-b"  # the unlisted twin is still callable by name


def test_deprecated_ollama_twin_does_not_hide_the_tag():
    cat = build_catalogue(
        [
            entry(name="a-old", backend="ollama", served_model_id="qwen3:8b", deprecated=True),
            entry(name="b-new", backend="ollama", served_model_id="qwen3:8b"),
        ]
    )
    assert [i.entry.name for i in cat.listed] == ["b-new"]


# -- resolution -------------------------------------------------------------------------------------------


def _cat():
    return build_catalogue(
        [
            entry(
                name="qwen-vl-awq",
                family="Qwen2.5-VL-7B-Instruct-AWQ",
                quantization="awq",
                served_model_id="Qwen/Qwen2.5-VL-7B-Instruct-AWQ",
            ),
            entry(
                name="llama-ollama",
                backend="ollama",
                served_model_id="llama3.2:3b",
                quantization="q4_k_m",
                metadata={"ollama_family": "llama", "ollama_parameter_size": "3.2B"},
            ),
            entry(name="gemma-a", display_name="Gemma 2"),
            entry(name="gemma_b", display_name="gemma-2"),
        ]
    )


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("qwen-vl-awq", "qwen-vl-awq"),  # logical name
        ("qwen2.5-vl-7b-instruct (AWQ)", "qwen-vl-awq"),  # listed id
        ("QWEN2.5 VL 7B Instruct AWQ", "qwen-vl-awq"),  # normalised id
        ("Qwen/Qwen2.5-VL-7B-Instruct-AWQ", "qwen-vl-awq"),  # served id
        ("QWEN_VL_AWQ", "qwen-vl-awq"),  # normalised logical name
        ("llama 3.2b (Q4 K M)", "llama-ollama"),
        ("llama3.2:3b", "llama-ollama"),
        ("Gemma 2", "gemma-a"),  # exact ids win over normalised ambiguity
        ("gemma-2", "gemma_b"),
    ],
)
def test_resolution(requested, expected):
    assert _cat().resolve(requested).name == expected


def test_ambiguous_normalised_match_is_a_404_listing_candidates():
    with pytest.raises(ProxyError) as info:
        _cat().resolve("GEMMA 2")
    err = info.value
    assert err.status == 404 and err.code == "model_not_found" and err.param == "model"
    assert "ambiguous" in err.message and "gemma-a" in err.message and "gemma_b" in err.message


def test_unknown_model_is_a_404_pointing_at_the_list():
    with pytest.raises(ProxyError) as info:
        _cat().resolve("gpt-4")
    assert info.value.status == 404 and info.value.code == "model_not_found"
    assert "'gpt-4'" in info.value.message and "/v1/models" in info.value.message


def test_normalise():
    assert normalise("Qwen2.5-VL (AWQ)") == "qwen25vlawq"


# -- through the app ---------------------------------------------------------------------------------------

EXTERNAL = {"base_url": "http://127.0.0.1:9/v1"}


async def test_decorations_change_labels_not_ids(make_config, registry_file, proxy_client):
    registry_file(
        [
            {
                "name": "qwen",
                "backend": "vllm",
                "backend_config": EXTERNAL,
                "family": "Qwen2.5-7B-Instruct-AWQ",
                "quantization": "awq",
                "download_format": "safetensors",
            },
            {"name": "other", "backend": "lmdeploy", "backend_config": EXTERNAL, "family": "internvl2-8b"},
        ]
    )
    plain = await (await proxy_client(make_config())).get("/v1/models")
    decorated = await (await proxy_client(make_config(SUPPRESS_DECORATIONS="0"))).get("/v1/models")
    plain_models = {m["id"]: m for m in (await plain.json())["data"]}
    decorated_models = {m["id"]: m for m in (await decorated.json())["data"]}
    assert set(plain_models) == set(decorated_models) == {"qwen2.5-7b-instruct (AWQ)", "internvl2-8b"}

    q_plain, q_dec = plain_models["qwen2.5-7b-instruct (AWQ)"], decorated_models["qwen2.5-7b-instruct (AWQ)"]
    assert q_plain["name"] == "qwen2.5-7b-instruct (AWQ)"
    for key in ("backend", "format", "quantization", "adapter"):
        assert key not in q_plain["extensions"]
    assert q_dec["name"] == "qwen2.5-7b-instruct (AWQ) · vllm · safetensors"
    assert q_dec["extensions"]["backend"] == "vllm"
    assert q_dec["extensions"]["format"] == "safetensors"
    assert q_dec["extensions"]["quantization"] == "awq"
    assert q_dec["extensions"]["adapter"] == "vllm-external"
    assert decorated_models["internvl2-8b"]["name"] == "internvl2-8b · lmdeploy"


async def test_ollama_decorated_label_adds_backend_and_format(make_config, registry_file, proxy_client):
    registry_file(
        [
            {
                "name": "l",
                "backend": "ollama",
                "served_model_id": "llama:12b",
                "quantization": "q4_k_m",
                "metadata": {"ollama_family": "llama", "ollama_parameter_size": "12.2B"},
            }
        ]
    )
    client = await proxy_client(make_config(SUPPRESS_DECORATIONS="0", INCLUDE_NON_INSTALLED="1"))
    data = (await (await client.get("/v1/models")).json())["data"]
    assert [(m["id"], m["name"]) for m in data] == [
        ("llama 12.2b (Q4 K M)", "llama 12.2b (Q4 K M) · ollama · gguf")
    ]


# -- property: every listed id resolves to the entry it is listed for ----------------------------------------

_words = st.sampled_from(
    [
        "llama",
        "qwen2.5",
        "Qwen2.5-VL-7B",
        "gpt-oss-20b",
        "gemma-2",
        "8b",
        "AWQ",
        "q4_k_m",
        "Instruct",
        "phi3",
        "mistral-7b",
        "x",
        "X",
        "a_b",
        "gguf",
    ]
)
_text = st.lists(_words, min_size=1, max_size=3).map(lambda ws: "-".join(ws))
_maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731


@st.composite
def _registry(draw):
    n = draw(st.integers(min_value=1, max_value=12))
    names = draw(st.lists(_text, min_size=n, max_size=n, unique=True))
    out = []
    for name in names:
        backend = draw(st.sampled_from(["ollama", "vllm", "openai", "lmdeploy"]))
        fields = {
            "name": name,
            "backend": backend,
            "display_name": draw(_maybe(_text)),
            "family": draw(_maybe(_text)),
            "quantization": draw(_maybe(st.sampled_from(["awq", "q4_k_m", "unknown", "fp16", "mxfp4"]))),
            "served_model_id": draw(_maybe(_text)),
            "deprecated": draw(st.booleans()),
        }
        if backend == "ollama":
            fields["metadata"] = {
                "ollama_family": draw(_maybe(_text)),
                "ollama_parameter_size": draw(_maybe(st.sampled_from(["7B", "12.2B"]))),
            }
        out.append(parse_entry(fields))
    return out


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_registry())
def test_every_listed_id_resolves_to_its_entry(entries):
    cat = build_catalogue(entries)
    ids = [item.id for item in cat.listed]
    assert len(ids) == len(set(ids)), "ids must be unique"
    for item in cat.listed:
        assert cat.resolve(item.id) is item.entry
        assert cat.id_of(item.entry) == item.id
    for e in entries:
        assert cat.resolve(e.name) is e, "every logical name resolves to its own entry"
    listed_names = {item.entry.name for item in cat.listed}
    unlisted = [e for e in entries if e.name not in listed_names]
    assert all(e.backend == "ollama" for e in unlisted), "only duplicate Ollama tags may be left out"
