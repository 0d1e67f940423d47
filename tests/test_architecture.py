"""The layering of the package, checked on its source: which folder may import which.

docs/architecture.md describes the layers; these rules keep the code and that page honest. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imageworks_proxy"
NAME = "imageworks_proxy"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
#: Functions still over the limit, each with the change that splits it. Empty this set, never grow it.
TOO_LONG_FOR_NOW: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports at run time (function-level imports included)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = {name: runtime_imports(path) for name, path in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(module: str) -> set[str]:
    """The package's own modules that ``module`` imports (``from x import y`` counts y when y is one)."""
    return {m for m in IMPORTS[module] if m in MODULES}


ADAPTER_IMPLEMENTATIONS = {
    m for m in MODULES if m.startswith(f"{NAME}.adapters.") and m != f"{NAME}.adapters.base"
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_adapters_cli_and_the_package_face_import_adapter_implementations(module):
    if layer(module) in ("adapters", "cli", "testing") or module == NAME:
        return
    assert not imported_modules(module) & ADAPTER_IMPLEMENTATIONS, (
        f"{module} imports an adapter implementation; use the capabilities on adapters.base.Adapter"
    )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "pipeline"))
def test_the_pipeline_never_imports_aiohttp_web(module):
    web = {"aiohttp.web", "aiohttp.web_request", "aiohttp.web_response"}
    assert not IMPORTS[module] & web, f"{module}: stages are plain objects, testable without HTTP"


# layer -> the package layers it must not import at run time
FORBIDDEN = {
    "wire": {"http", "pipeline", "adapters", "gpu", "vllm", "upstream", "observability", "cli", "catalogue",
             "app", "testing"},
    "catalogue": {"http", "pipeline", "gpu", "vllm", "upstream", "observability", "cli", "app", "testing"},
    "gpu": {"http", "pipeline", "adapters", "vllm", "upstream", "observability", "cli", "catalogue", "app",
            "testing"},
    "upstream": {"http", "pipeline", "vllm", "observability", "cli", "app", "testing"},
    "vllm": {"http", "pipeline", "cli", "app", "testing"},
    "observability": {"http", "pipeline", "adapters", "vllm", "cli", "app", "testing"},
    "pipeline": {"http", "cli", "app", "testing"},
    "http": {"cli", "testing"},
    "adapters": {"http", "cli", "app", "testing"},
}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(module):
    bad = sorted(m for m in imported_modules(module) if layer(m) in FORBIDDEN[layer(module)])
    assert not bad, f"{module} ({layer(module)}/) imports {bad}"


def test_nothing_but_the_entry_points_imports_the_command_line_layer():
    users = sorted(m for m in MODULES if layer(m) not in ("cli",) and any(
        layer(i) == "cli" for i in imported_modules(m)) and m != f"{NAME}.__main__")
    assert users == []


@pytest.mark.parametrize("path", sorted(MODULES.values()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by idea"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if (path.name, node.name) in TOO_LONG_FOR_NOW:
                continue
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}() is {length} lines"


def test_importing_the_package_does_not_import_the_app_or_the_testing_kit():
    code = (
        "import sys, imageworks_proxy as p; "
        "assert 'imageworks_proxy.app' not in sys.modules, 'app'; "
        "assert not [m for m in sys.modules if m.startswith('imageworks_proxy.testing')], 'testing'; "
        "assert callable(p.create_app) and 'imageworks_proxy.app' in sys.modules; "
        "print(len([m for m in sys.modules if m.startswith('imageworks_proxy')]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_public_api_is_declared_and_importable():
    import imageworks_proxy

    for name in ("create_app", "hookimpl", "Adapter", "ChatCall", "Stage", "ChatContext", "ProxyError",
                 "Tenant", "Lease", "tenancy", "Entry", "Config", "load_config", "OpenAIPassthroughAdapter"):
        assert name in imageworks_proxy.__all__
        assert getattr(imageworks_proxy, name) is not None
    assert sorted(imageworks_proxy.__all__) == imageworks_proxy.__all__
