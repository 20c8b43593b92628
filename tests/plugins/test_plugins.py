"""The plugin system: built-in adapters through the hooks, and a third-party distribution
(tests/plugins/sample_plugin, pip-installed into a temporary folder) whose route a real
server serves and whose command the CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from support.model_plugin import PLUGINS_DIR, pip_install_target

from lightllm_plugin import plugins as P


@pytest.fixture(scope="module")
def sample_path(tmp_path_factory) -> str:
    """A folder on whose PYTHONPATH the sample plugin is installed."""
    return pip_install_target(PLUGINS_DIR / "sample_plugin", tmp_path_factory.mktemp("sample_plugin"))


def _env(sample_path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (P.ENV_PLUGINS, P.ENV_SKIP_BROKEN)}
    env["PYTHONPATH"] = os.pathsep.join([sample_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def cli(sample_path: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightllm_plugin.cli", *args], capture_output=True, text=True,
                          env=_env(sample_path, **env), timeout=120)


# ---- in process: the built-ins --------------------------------------------------------------
def test_builtin_plugins_register_through_the_hooks(monkeypatch):
    monkeypatch.setenv(P.ENV_PLUGINS, "")  # no third-party plugin
    pm = P.load_plugins()
    assert set(pm.infos) == set(P.BUILTIN_PLUGINS)
    assert pm.infos["openai"].hooks == ["register_routes"] and pm.infos["native"].hooks == ["register_routes"]
    assert set(P.collect_commands(pm)) == {"serve", "generate", "bench", "plugins", "ray-serve"}
    assert "LlamaForCausalLM" in P.collect_models(pm)


def test_builtin_routes_come_from_plugins(monkeypatch):
    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.server.api import create_app

    monkeypatch.setenv(P.ENV_PLUGINS, "")
    app = create_app(object(), EngineConfig(model_dir="/m/x"))  # routes are only registered here
    paths = set(app.openapi()["paths"])
    assert {"/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/health"} <= paths


def test_a_hook_that_raises_is_named_and_skipped_only_on_request():
    class Bad:
        @P.hookimpl
        def register_cli(self, cli):
            raise KeyError("nope")

    pm = P.PluginManager()
    pm.add(Bad(), P.PluginInfo("bad", "test", "1", "Bad"))
    with pytest.raises(P.PluginError, match="plugin 'bad' failed in register_cli"):
        P.collect_commands(pm)
    pm = P.PluginManager(skip_broken=True)
    pm.add(Bad(), P.PluginInfo("bad", "test", "1", "Bad"))
    assert P.collect_commands(pm) == {} and "bad" in pm.broken and "bad" not in pm.infos


# ---- a third-party distribution ---------------------------------------------------------------
def test_plugins_command_lists_the_third_party_plugin(sample_path):
    done = cli(sample_path, "plugins", LIGHTLLM_PLUGINS="sample")
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith("sample "))
    assert "0.3.1" in line and "lightllm-sample-plugin" in line
    assert "register_cli, register_models, register_routes" in line
    assert "sample-hello (sample)" in done.stdout and "SampleForCausalLM" in done.stdout
    assert "openai" in done.stdout and "native" in done.stdout


def test_third_party_command_runs(sample_path):
    done = cli(sample_path, "sample-hello", "there", LIGHTLLM_PLUGINS="sample")
    assert done.returncode == 0 and done.stdout.strip() == "sample says hello there", done.stderr
    usage = cli(sample_path, "--help", LIGHTLLM_PLUGINS="sample")
    assert "sample-hello" in usage.stderr


def test_broken_plugin_is_an_error_naming_it_unless_skipped(sample_path):
    done = cli(sample_path, "plugins")  # both of the distribution's entry points load
    assert done.returncode == 1
    assert "plugin 'sample_broken'" in done.stderr and "broken on purpose" in done.stderr
    skipped = cli(sample_path, "plugins", LIGHTLLM_PLUGINS_SKIP_BROKEN="1")
    assert skipped.returncode == 0, skipped.stderr
    assert "sample_broken" in skipped.stderr and "skipped" in skipped.stderr
    assert any(l.startswith("sample ") for l in skipped.stdout.splitlines())


def test_server_refuses_to_start_with_a_broken_plugin(sample_path):
    done = subprocess.run([sys.executable, "-m", "lightllm_plugin.server", "--port", "0"], capture_output=True,
                          text=True, env=_env(sample_path), timeout=120)
    assert done.returncode == 1
    assert "ERROR:" in done.stderr and "plugin 'sample_broken'" in done.stderr and "--skip_broken_plugins" in done.stderr


@pytest.mark.slow
def test_server_serves_the_plugin_route_skipping_the_broken_one(sample_path, launch_server):
    server = launch_server("--skip_broken_plugins", env=_env(sample_path))
    assert "plugin 'sample_broken'" in server.output
    body = httpx.get(server.url + "/sample/hello", timeout=30).json()
    assert body["hello"] == "from sample" and body["engine"] == "AsyncEngineClient"
    assert body["model"].endswith(".gguf") or body["model"]
    # the built-in plugins' routes are all there too
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 200
    r = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200
