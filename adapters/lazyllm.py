"""LazyLLM adapter: `lazyllm.deploy.lightllm` runs this engine.

    import lightllm_plugin.adapters.lazyllm  # noqa: F401  (once, before deploy.lightllm is looked up)
    import lazyllm
    m = lazyllm.TrainableModule("/models/SmolLM2-135M-Instruct").deploy_method(lazyllm.deploy.lightllm)

Importing this module calls `register()`, which points LazyLLM's `deploy.lightllm` key at
`LightllmPlugin` and adds the key `deploy.lightllm_plugin`. LightllmPlugin is LazyLLM's own
`Lightllm` deployer with one method changed, `cmd`: it starts `python -m lightllm_plugin.server`
(this engine's drop-in for `python -m lightllm.server.api_server`) with LazyLLM's flags, so the
request format, the readiness line it waits for (`Uvicorn running on`), the `url=` shortcut and
the result parsing are LazyLLM's, unchanged.
"""

from __future__ import annotations

import os
import shlex
import sys

try:
    import lazyllm
    from lazyllm.common import LazyLLMCMD
    from lazyllm.components.deploy.base import verify_fastapi_func
    from lazyllm.components.deploy.lightllm import Lightllm
    from lazyllm.components.deploy.utils import get_log_path
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lightllm_plugin.adapters.lazyllm needs LazyLLM: pip install 'lightllm-plugin[lazyllm]'"
    ) from exc

# the keys this adapter takes in lazyllm.deploy: LazyLLM's own name, and ours
REGISTRY_KEYS = ("lightllm", "lightllm_plugin")
# what makes a folder a model this engine loads (LazyLLM itself looks for .bin/.safetensors)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")

_replaced: dict[str, type] = {}  # key -> what lazyllm.deploy held before register()


class LightllmPlugin(Lightllm):
    """LazyLLM's `Lightllm` deployer, launching lightllm_plugin's server.

    Same keyword arguments and defaults as `lazyllm.deploy.Lightllm` (tp, max_total_token_num,
    eos_id, port, host, data_type, max_req_total_len, ...). The server runs under the Python
    that runs LazyLLM (`sys.executable`), so the environment that has lightllm_plugin serves.
    """

    # kept out of LazyLLM's class registry (its metaclass asserts on a second class of one
    # name, e.g. when this module is reloaded); register() places it instead
    __lazyllm_registry_disable__ = True

    def cmd(self, finetuned_model=None, base_model=None):
        model = pick_model(finetuned_model, base_model)

        def impl():
            # LazyLLM draws fresh ports on every (re)start, as its Lightllm does
            if self.random_port:
                self.kw["port"] = _random_port(30000, 40000)
            if self.random_nccl_port:
                self.kw["nccl_port"] = _random_port(20000, 30000)
            cmd = shlex.join(server_argv(model, dict(self.kw), self.options_keys))
            if self.temp_folder:
                cmd += f" 2>&1 | tee {shlex.quote(get_log_path(self.temp_folder))}"
            return cmd

        return LazyLLMCMD(cmd=impl, return_value=self.geturl, checkf=verify_fastapi_func)


def _random_port(low: int, high: int) -> int:
    import random

    return random.randint(low, high)


def holds_weights(path: str | None) -> bool:
    """A .gguf file, or a folder with weights this engine loads."""
    if not path or not os.path.exists(path):
        return False
    if os.path.isfile(path):
        return path.lower().endswith(".gguf")
    return any(name.lower().endswith(_WEIGHT_SUFFIXES) for name in os.listdir(path))


def pick_model(finetuned_model: str | None, base_model: str | None) -> str | None:
    """LazyLLM's rule: the fine-tuned model when it holds weights, else the base model.
    None (no model named at all) lets the server use its default model."""
    if holds_weights(finetuned_model):
        return finetuned_model
    return base_model or None


def server_argv(model: str | None, kw: dict, options_keys=()) -> list[str]:
    """The server's command line: LazyLLM's flags as LightLLM spells them."""
    argv = [sys.executable, "-m", "lightllm_plugin.server"]
    if model:
        argv.append(f"--model_dir={model}")
    for key, value in kw.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):  # eos_id=[2, 7]
            argv += [f"--{key}", *map(str, value)]
        else:
            argv.append(f"--{key}={value}")
    argv += [f"--{key}" for key in options_keys]
    return argv


def register(deploy_registry=None) -> type:
    """Point `deploy.lightllm` (and `deploy.lightllm_plugin`) at LightllmPlugin. Idempotent;
    `unregister()` restores what LazyLLM had. A plain function, so a plugin hook can call it."""
    registry = lazyllm.deploy if deploy_registry is None else deploy_registry
    for key in REGISTRY_KEYS:
        previous = dict.get(registry, key)
        if previous is not LightllmPlugin and key not in _replaced:
            _replaced[key] = previous
        registry[key] = LightllmPlugin
    return LightllmPlugin


def unregister(deploy_registry=None) -> None:
    registry = lazyllm.deploy if deploy_registry is None else deploy_registry
    for key in REGISTRY_KEYS:
        previous = _replaced.pop(key, None)
        if previous is not None:
            registry[key] = previous
        elif dict.get(registry, key) is LightllmPlugin:
            dict.pop(registry, key)


register()
