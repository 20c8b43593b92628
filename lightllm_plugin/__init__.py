"""lightllm-plugin: a LightLLM-class inference engine reachable from OpenAI clients, LangChain and LazyLLM."""

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch is imported only when the engine is asked for, so the HTTP front end and the
    # tokenizer/detokenizer processes start fast and stay small
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from lightllm_plugin import llm

        return getattr(llm, name)
    raise AttributeError(name)
