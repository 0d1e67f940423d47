"""The testing kit adapter authors get (``imageworks_proxy.testing``, docs/testing.md): the documented
example passes as written, the fakes run as processes, the shape checks name what is wrong, and the kit
stays out of the proxy's imports."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imageworks_proxy.testing import check_chunk, check_completion, check_error, free_port
from tests.process_helpers import wait_for_json

DOC = Path(__file__).parents[1] / "docs" / "testing.md"

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1767225600,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
}
CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1767225600,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}
ERROR = {"error": {"message": "no such model", "type": "invalid_request_error", "param": None, "code": "x"}}


def doc_files() -> dict[str, str]:
    """The doc's python blocks that start with ``# <path>``; ``# <path>, ...`` continues that file."""
    files: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        first, _, rest = block.partition("\n")
        named = re.fullmatch(r"# (\S+\.py)(,.*)?", first)
        if named:
            path = named.group(1)
            files[path] = files[path] + "\n\n" + rest if named.group(2) else block
    return files


def test_the_example_in_docs_testing_md_passes_as_written(pytester: pytest.Pytester):
    files = doc_files()
    assert set(files) == {"my_adapter.py", "tests/conftest.py", "tests/test_my_adapter.py"}
    for path, text in files.items():
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "testpaths = tests\nfilterwarnings = error\n"
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=9)


def test_importing_the_proxy_leaves_the_kit_out_and_the_kit_leaves_pytest_out():
    code = (
        "import json, sys\n"
        "import imageworks_proxy\n"
        "kit = 'imageworks_proxy.testing' in sys.modules\n"
        "import imageworks_proxy.testing, imageworks_proxy.testing.fakes.openai\n"
        "import imageworks_proxy.testing.fakes.ollama, imageworks_proxy.testing.fakes.vllm\n"
        "print(json.dumps({'kit': kit, 'pytest': 'pytest' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == {"kit": False, "pytest": False}


def test_the_fake_vllm_runs_as_a_module():
    port = free_port()
    argv = [sys.executable, "-m", "imageworks_proxy.testing.fakes.vllm", "--model", "/m/x"]
    argv += ["--served-model-name", "served-x", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        models = wait_for_json(proc, f"http://127.0.0.1:{port}/v1/models")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert [m["id"] for m in models["data"]] == ["served-x"]


@pytest.mark.parametrize(
    ("check", "body", "path"),
    [
        (check_completion, COMPLETION, ("id",)),
        (check_completion, COMPLETION, ("created",)),
        (check_completion, COMPLETION, ("choices", 0, "logprobs")),
        (check_completion, COMPLETION, ("choices", 0, "message", "refusal")),
        (check_chunk, CHUNK, ("model",)),
        (check_chunk, CHUNK, ("choices", 0, "finish_reason")),
        (check_error, ERROR, ("error", "param")),
        (check_error, ERROR, ("error", "code")),
    ],
)
def test_shape_checks_name_the_missing_field(check, body, path):
    check(body)  # the complete body passes
    broken = copy.deepcopy(body)
    *parents, last = path
    holder = broken
    for key in parents:
        holder = holder[key]
    del holder[last]
    with pytest.raises(AssertionError, match=repr(last)):
        check(broken)


def test_shape_checks_refuse_unknown_finish_reasons_and_objects():
    with pytest.raises(AssertionError, match="finish_reason"):
        check_completion({**COMPLETION, "choices": [{**COMPLETION["choices"][0], "finish_reason": "done"}]})
    with pytest.raises(AssertionError, match=r"not 'chat\.completion\.chunk'"):
        check_chunk({**CHUNK, "object": "chat.completion"})
