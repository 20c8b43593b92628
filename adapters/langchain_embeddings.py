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
import threading
import time
from typing import Any

import httpx
from langchain_core.embeddings import Embeddings
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from .langchain import RETRY_STATUSES, OwnedServer, _checked


class LightLLMEmbeddings(BaseModel, Embeddings):
    """Embeddings from a lightllm-plugin server serving an embedding model (`--task embed`)."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    base_url: str | None = Field(default_factory=from_env("LIGHTLLM_BASE_URL", default=None))
    """A running server's OpenAI base URL (`http://host:port/v1`; `http://host:port` works too).
    Default: $LIGHTLLM_BASE_URL, else none (a server is started for model_dir)."""
    model: str | None = Field(default=None, alias="model_name")
    """The model name sent with each request (default: the one the server serves)."""
    model_dir: str | None = None
    """Start and own a server for this model folder when base_url is not given."""
    server_args: list[str] = Field(default_factory=list)
    """Extra `lightllm-plugin serve` flags for an owned server."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("LIGHTLLM_API_KEY", default=None))
    dimensions: int | None = None
    """Matryoshka truncation, for models whose config declares it."""
    chunk_size: int = 64
    """Texts per request."""
    timeout: float | None = 120.0
    max_retries: int = 2

    _server: OwnedServer | None = PrivateAttr(default=None)
    _served_name: str | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _root(self) -> str:
        if self.base_url:
            url = self.base_url.rstrip("/")
            return url if url.endswith("/v1") else url + "/v1"
        with self._lock:
            if self._server is None or not self._server.alive:
                self._server = OwnedServer(self.model_dir or self.model, self.server_args)
        return self._server.url + "/v1"

    def close(self) -> None:
        """Stop the server these embeddings started (if any)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def _headers(self) -> dict[str, str]:
        key = self.api_key.get_secret_value() if self.api_key else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _model_name(self) -> str:
        if self.model and (self.base_url or self.model_dir):
            return self.model
        if self._served_name is None:
            with httpx.Client(timeout=self.timeout, headers=self._headers()) as client:
                self._served_name = _checked(client.get(self._root() + "/models"))["data"][0]["id"]
        return self._served_name

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
        url, payload = self._root() + "/embeddings", self._payload(texts)
        for attempt in range(self.max_retries + 1):
            try:
                with httpx.Client(timeout=self.timeout, headers=self._headers()) as client:
                    response = client.post(url, json=payload)
                if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                return self._vectors(_checked(response))
            except httpx.TransportError:
                if attempt >= self.max_retries:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def _apost(self, client: httpx.AsyncClient, texts: list[str]) -> list[list[float]]:
        url, payload = self._root() + "/embeddings", self._payload(texts)
        for attempt in range(self.max_retries + 1):
            try:
                response = await client.post(url, json=payload)
                if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                    await asyncio.sleep(0.5 * 2**attempt)
                    continue
                return self._vectors(_checked(response))
            except httpx.TransportError:
                if attempt >= self.max_retries:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    # ---- Embeddings --------------------------------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [vector for batch in self._batches(list(texts)) for vector in self._post(batch)]

    def embed_query(self, text: str) -> list[float]:
        return self._post([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        # the first call may start a server or ask for the model's name: done before the batches
        await asyncio.to_thread(self._model_name)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self._headers()) as client:
            results = await asyncio.gather(*(self._apost(client, batch) for batch in self._batches(list(texts))))
        return [vector for batch in results for vector in batch]

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.aembed_documents([text]))[0]
