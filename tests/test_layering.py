"""The layers import downwards only: adapters -> server -> engine -> models -> kernels, read from
the source of every module (including imports inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the lightllm_plugin packages its modules must never import
FORBIDDEN = {
    "lightllm_plugin/engine": ("server", "adapters"),
    "lightllm_plugin/models": ("engine", "server", "adapters"),
    "kernels": ("models", "engine", "server", "adapters"),
}
# the modules both sides share sit below every layer
SHARED = ["config.py", "sampling_params.py", "ipc.py", "text_stream.py", "chat_template.py", "plugins.py"]


def package_of(path: Path) -> list[str]:
    """The dotted package a file belongs to once installed (kernels/ and adapters/ install under
    lightllm_plugin)."""
    parts = list(path.relative_to(ROOT).parent.parts)
    return parts if parts[0] == "lightllm_plugin" else ["lightllm_plugin", *parts]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package_of(path)[: len(package_of(path)) - node.level + 1] if node.level else []
            names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


FORBIDDEN.update({f"lightllm_plugin/{name}": ("engine", "models", "server", "adapters") for name in SHARED})


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_its_own(folder):
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else [ROOT / folder]:
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "lightllm_plugin" and len(parts) > 1 and parts[1] in FORBIDDEN[folder]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_the_offline_llm_imports_no_server_or_adapter():
    names = imported_modules(ROOT / "lightllm_plugin" / "llm.py")
    assert not [n for n in names if n.startswith(("lightllm_plugin.server", "lightllm_plugin.adapters"))]
