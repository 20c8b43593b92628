"""The built-in plugin "lazyllm": declares the LazyLLM adapter (adapters/lazyllm.py, the
`deploy.lightllm` method) through the `register_adapters` hook.

Deliberately light: importing lazyllm takes seconds, and only a LazyLLM program needs it (it
imports `lightllm_plugin.adapters.lazyllm`, which points `lazyllm.deploy.lightllm` at this
engine); the server only names the adapter, and `lightllm-plugin plugins` says whether it
can be used.
"""

from __future__ import annotations

from lightllm_plugin.plugins import hookimpl


@hookimpl(tryfirst=True)
def register_adapters(register) -> None:
    register(
        "lazyllm",
        "lightllm_plugin.adapters.lazyllm",
        extra="lazyllm",
        summary="lazyllm.deploy.lightllm runs this engine (import the module first)",
    )
