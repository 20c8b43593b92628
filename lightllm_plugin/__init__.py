"""lightllm-plugin: a LightLLM-class inference engine reachable from OpenAI clients, LangChain and LazyLLM."""

import os

# How long an OpenMP thread spins for the next parallel region before it sleeps. A CPU decode
# step is hundreds of small regions: passive waiting (no spin) nearly halved its speed (67 -> 38
# tok/s on the default model, 61 -> 34 through the server), while OpenMP's default spin (300000
# rounds, or ACTIVE's endless one) makes torch 5-20x slower as soon as another process (a
# tokenizer, a second engine, the test runner) wants the core. 10000 rounds decode as fast as
# the default and give the core back soon. It must be set before torch loads its OpenMP runtime
# (libgomp, where it also overrides OMP_WAIT_POLICY); a user's own setting still wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from lightllm_plugin.config import EngineConfig  # noqa: E402
from lightllm_plugin.sampling_params import SamplingParams  # noqa: E402
from lightllm_plugin.structured_outputs import StructuredOutputs  # noqa: E402

StructuredOutputsParams = StructuredOutputs  # vLLM's name

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "StructuredOutputsParams", "EngineConfig",
           "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch is imported only when the engine is asked for, so the HTTP front end and the
    # tokenizer/detokenizer processes start fast and stay small
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from lightllm_plugin import llm

        return getattr(llm, name)
    raise AttributeError(name)
