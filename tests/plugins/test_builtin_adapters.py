"""The LangChain and LazyLLM adapters are built-in plugins like the others, declared through
`register_adapters`, and loading them imports neither langchain_core nor lazyllm."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

from lightllm_plugin import plugins as P


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_langchain_and_lazyllm_are_builtin_plugins(monkeypatch):
    monkeypatch.setenv(P.ENV_PLUGINS, "")
    pm = P.load_plugins()
    for name in ("langchain", "lazyllm"):
        assert name in P.BUILTIN_PLUGINS
        assert pm.infos[name].source == "builtin" and pm.infos[name].hooks == ["register_adapters"]
    adapters = P.collect_adapters(pm)
    assert set(adapters) == {"langchain", "lazyllm", "ray_serve"}
    assert adapters["langchain"].module == "lightllm_plugin.adapters.langchain"
    assert adapters["lazyllm"].module == "lightllm_plugin.adapters.lazyllm"
    assert adapters["langchain"].plugin == "langchain" and adapters["lazyllm"].extra == "lazyllm"
    # their requirements are the extras' in pyproject.toml, read from the installed metadata
    assert adapters["lazyllm"].requirements() == P.extra_requirements("lazyllm")
    assert any(r.startswith("lazyllm") for r in adapters["lazyllm"].requirements())
    assert any(r.startswith("langchain-core") for r in adapters["langchain"].requirements())
    # their status follows what is installed (the test extra installs both)
    assert adapters["langchain"].available == _installed("langchain-core")
    assert adapters["lazyllm"].available == _installed("lazyllm")


def test_an_adapter_whose_library_is_missing_is_listed_as_unavailable():
    registry = P.AdapterRegistry()
    registry("ghost", "ghost_adapter", requires=("surely-not-an-installed-distribution>=1",), extra="ghost")
    registry("old", "old_adapter", requires=("pluggy<1",))
    registry("plain", "plain_adapter")
    ghost, old, plain = registry.adapters["ghost"], registry.adapters["old"], registry.adapters["plain"]
    assert not ghost.available and ghost.status() == (
        "unavailable: needs surely-not-an-installed-distribution>=1 (pip install 'lightllm-plugin[ghost]')")
    assert not old.available and "pluggy<1 (" + importlib.metadata.version("pluggy") + " installed)" in old.status()
    assert plain.available and plain.status() == "available"


def test_loading_the_plugins_and_building_the_app_imports_neither_library():
    """What the server does at start (plugins, routes, the adapter list) leaves lazyllm (seconds
    to import) and langchain_core out of the process."""
    code = (
        "import sys\n"
        "from lightllm_plugin import plugins as P\n"
        "from lightllm_plugin.config import EngineConfig\n"
        "from lightllm_plugin.server.api import create_app\n"
        "pm = P.load_plugins()\n"
        "create_app(object(), EngineConfig(model_dir='/m/x'), plugins=pm)\n"
        "print(sorted(P.collect_adapters(pm)))\n"
        "from lightllm_plugin.cli import main\n"
        "assert main(['plugins']) == 0\n"
        "print('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in ('lazyllm', 'langchain_core', 'ray')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (P.ENV_PLUGINS, P.ENV_SKIP_BROKEN)}
    env[P.ENV_PLUGINS] = ""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "['langchain', 'lazyllm', 'ray_serve']" in lines and "heavy: []" in lines
    # `lightllm-plugin plugins` lists both, with their status
    langchain = next(l for l in lines if l.strip().startswith("langchain (langchain):"))
    lazyllm = next(l for l in lines if l.strip().startswith("lazyllm (lazyllm):"))
    assert "lightllm_plugin.adapters.langchain" in langchain and "lightllm_plugin.adapters.lazyllm" in lazyllm
    assert ("available (langchain-core " in langchain) == _installed("langchain-core")
    assert ("available (lazyllm " in lazyllm) == _installed("lazyllm")
