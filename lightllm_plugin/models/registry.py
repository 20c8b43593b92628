"""The built-in model architectures: a plain table, read by the loader without loading any plugin
(the built-in plugins bring the HTTP stack), and declared through the `register_models` hook too,
so `lightllm-plugin plugins` lists them beside the third-party ones."""

from __future__ import annotations

from typing import Any

from lightllm_plugin.models.model_config import (
    SEQUENCE_CLASSIFICATION_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    VISION_LANGUAGE_ARCHITECTURES,
)
from lightllm_plugin.plugins import hookimpl


def builtin_models() -> dict[str, Any]:
    """Architecture name -> model class. The classes import torch, so they load on first use:
    the api process lists the table without paying for it."""
    from lightllm_plugin.models.classifier import SequenceClassificationModel
    from lightllm_plugin.models.llama import LlamaFamilyModel
    from lightllm_plugin.models.llava import LlavaModel
    from lightllm_plugin.models.qwen2_vl import Qwen2VLModel

    table = {architecture: LlamaFamilyModel for architecture in SUPPORTED_ARCHITECTURES}
    table.update({architecture: SequenceClassificationModel for architecture in SEQUENCE_CLASSIFICATION_ARCHITECTURES})
    table.update({architecture: Qwen2VLModel for architecture in VISION_LANGUAGE_ARCHITECTURES})
    table["LlavaForConditionalGeneration"] = LlavaModel
    return table


@hookimpl(tryfirst=True)
def register_models(register) -> None:
    for architecture, model_class in builtin_models().items():
        register(architecture, model_class)
