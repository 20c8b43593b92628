"""The built-in plugin "langchain": declares the LangChain adapter (adapters/langchain.py,
`LightLLM` and `ChatLightLLM`) through the `register_adapters` hook.

Deliberately light: the adapter itself imports langchain_core, which the server never needs,
so this module only names it; `lightllm-plugin plugins` says whether it can be used.
"""

from __future__ import annotations

from lightllm_plugin.plugins import hookimpl


@hookimpl(tryfirst=True)
def register_adapters(register) -> None:
    register(
        "langchain",
        "lightllm_plugin.adapters.langchain",
        extra="langchain",
        summary="LightLLM (an LLM) and ChatLightLLM (a chat model) over the /v1 routes",
    )
