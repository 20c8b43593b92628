"""LangChain embeddings: `LightLLMEmbeddings`, an `Embeddings` over this server's /v1/embeddings.

    from lightllm_plugin.adapters.langchain import LightLLMEmbeddings
    emb = LightLLMEmbeddings(base_url="http://127.0.0.1:8000/v1")      # a running server
    emb = LightLLMEmbeddings(model_dir="/models/Qwen3-Embedding-0.6B")  # or start (and own) one
    emb.embed_documents(["first text", "second text"]); emb.embed_query("a question")

Texts go in batches of `chunk_size` per request (the server batches each one in the engine);
`aembed_documents` sends its batches at once. With no `base_url`, a server is started for
`model_dir` as ChatLightLLM starts one, and stopped by `close()` or at exit.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.embeddings import Embeddings

from .langchain import ServerConnection


class LightLLMEmbeddings(ServerConnection, Embeddings):
    """Embeddings from a lightllm-plugin server serving an embedding model (`--task embed`)."""

    dimensions: int | None = None
    """Matryoshka truncation, for models whose config declares it."""
    chunk_size: int = 64
    """Texts per request."""

    def _payload(self, texts: list[str]) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self._model_name(), "input": texts, "encoding_format": "float"}
        if self.dimensions is not None:
            payload["dimensions"] = self.dimensions
        return payload

    def _batches(self, texts: list[str]) -> list[list[str]]:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        return [texts[i : i + self.chunk_size] for i in range(0, len(texts), self.chunk_size)]

    @staticmethod
    def _vectors(body: dict) -> list[list[float]]:
        return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]

    def _post(self, texts: list[str]) -> list[list[float]]:
        return self._vectors(self._request_json("POST", "/embeddings", self._payload(texts)))

    # ---- Embeddings --------------------------------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [vector for batch in self._batches(list(texts)) for vector in self._post(batch)]

    def embed_query(self, text: str) -> list[float]:
        return self._post([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        # the first call may start a server or ask for the model's name: done before the batches
        await asyncio.to_thread(self._model_name)
        bodies = await asyncio.gather(*(self._arequest_json("/embeddings", self._payload(batch))
                                        for batch in self._batches(list(texts))))
        return [vector for body in bodies for vector in self._vectors(body)]

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]
