"""The built-in model architectures, declared through the `register_models` plugin hook."""

from __future__ import annotations

from lightllm_plugin.models.model_config import SUPPORTED_ARCHITECTURES
from lightllm_plugin.plugins import hookimpl


@hookimpl(tryfirst=True)
def register_models(register) -> None:
    from lightllm_plugin.models.llama import LlamaFamilyModel

    for architecture in SUPPORTED_ARCHITECTURES:
        register(architecture, LlamaFamilyModel)
