"""LangChain's and LazyLLM's embeddings against the session's embedding server.

`LightLLMEmbeddings` passes langchain-tests' standard EmbeddingsUnitTests and
EmbeddingsIntegrationTests, and its vectors (sync, async, batched) equal transformers'; the
OpenAI path (`langchain_openai.OpenAIEmbeddings(base_url=..., check_embedding_ctx_length=False)`)
and LazyLLM 1.4's `OnlineEmbeddingModule(source="openai", url=...)` get the same vectors from
/v1/embeddings.
"""

from __future__ import annotations

import asyncio

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests
from support.pooling_models import HFReference, rel_err

from lightllm_plugin.adapters.langchain import LightLLMEmbeddings

pytestmark = pytest.mark.slow  # the session's two pooling servers take ~15 s to start

TEXTS = ["The capital of France is Paris.", "Cats sleep most of the day.", "A", "Rain is expected tomorrow " * 8,
         "Photosynthesis turns light into chemical energy."]
_URL: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def server(pooling_servers):
    server = pooling_servers["embed"]
    _URL["base_url"] = server.url + "/v1"
    return server


@pytest.fixture(scope="module")
def expected(server):
    from lightllm_plugin.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(server.folder)
    ref = HFReference(server.folder, "qwen3_embed_last")
    return [ref(tokenizer.encode(t)) for t in TEXTS]


class TestLightLLMEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self):
        return LightLLMEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"base_url": "http://127.0.0.1:9/v1", "model": "m"}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return {"LIGHTLLM_BASE_URL": "http://127.0.0.1:9/v1"}, {"model": "m"}, {"base_url": "http://127.0.0.1:9/v1"}


class TestLightLLMEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self):
        return LightLLMEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"base_url": _URL["base_url"]}


def test_vectors_equal_transformers_sync_async_and_batched(expected):
    emb = LightLLMEmbeddings(base_url=_URL["base_url"], chunk_size=2)  # 5 texts: 3 requests
    for vector, want in zip(emb.embed_documents(TEXTS), expected):
        assert rel_err(vector, want) < 1e-4
    for vector, want in zip(asyncio.run(emb.aembed_documents(TEXTS)), expected):
        assert rel_err(vector, want) < 1e-4
    assert rel_err(emb.embed_query(TEXTS[1]), expected[1]) < 1e-4
    assert emb.embed_documents([]) == []
    short = LightLLMEmbeddings(base_url=_URL["base_url"], dimensions=16).embed_query(TEXTS[0])
    assert len(short) == 16


def test_langchain_openai_embeddings(expected):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(base_url=_URL["base_url"], api_key="unused", model=_served_model(),
                           check_embedding_ctx_length=False)
    for vector, want in zip(emb.embed_documents(TEXTS), expected):
        assert rel_err(vector, want) < 1e-4
    assert rel_err(asyncio.run(emb.aembed_query(TEXTS[2])), expected[2]) < 1e-4


def test_lazyllm_online_embedding_module(expected):
    import lazyllm

    module = lazyllm.OnlineEmbeddingModule(source="openai", url=_URL["base_url"] + "/", model=_served_model(),
                                           api_key="unused")
    assert rel_err(module(TEXTS[0]), expected[0]) < 1e-4
    for vector, want in zip(module(TEXTS), expected):
        assert rel_err(vector, want) < 1e-4


def _served_model() -> str:
    import httpx

    return httpx.get(_URL["base_url"] + "/models", timeout=10).json()["data"][0]["id"]
