"""lightllm-plugin: a LightLLM-class inference engine reachable from OpenAI clients, LangChain and LazyLLM."""

import os

# OpenMP's default busy-waiting makes CPU torch 5-20x slower as soon as another process
# (a tokenizer, a second engine, the test runner) wants a core; it must be set before
# torch loads its OpenMP runtime, and a user's own setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lightllm_plugin.config import EngineConfig  # noqa: E402
from lightllm_plugin.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch is imported only when the engine is asked for, so the HTTP front end and the
    # tokenizer/detokenizer processes start fast and stay small
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from lightllm_plugin import llm

        return getattr(llm, name)
    raise AttributeError(name)
