"""What a model without a sampler returns, described for every process.

The router resolves it once from the checkpoint (models/pooling_config.py) and reports it in its
Ready message, so the api process, which never loads the model, knows which routes to serve and
what the engine's vectors mean.
"""

from __future__ import annotations

import msgspec

# --task values; auto: from the architecture, and the folder's sentence-transformers files
TASKS = ("auto", "generate", "reward", "embed", "classify", "score")
POOLING_TASKS = ("reward", "embed", "classify", "score")

# the routes each kind of served model answers, named in the 400 a wrong route gets
GENERATION_ROUTES = "/generate, /generate_stream, /v1/completions, /v1/chat/completions"
EMBEDDING_ROUTES = "/v1/embeddings, /pooling, /score, /v1/rerank"
CLASSIFIER_ROUTES = "/get_score, /classify, /pooling, /score, /v1/rerank"


class PoolerInfo(msgspec.Struct, kw_only=True, frozen=True):
    task: str  # the resolved task: reward, embed, classify or score
    head: str  # "embed": the pooled hidden state; "classify": the score head's logits
    pooling: str  # "last" (the last token's hidden state) or "mean" (over the prompt)
    normalize: bool  # embeddings come back with unit L2 norm
    dimensions: int  # length of the engine's vector: hidden_size, or num_labels
    matryoshka_dimensions: list[int] | None = None  # truncations the model was trained for
    is_matryoshka: bool = False  # any truncation is allowed
    labels: list[str] = []  # class names, index order (classify head)

    def routes(self) -> str:
        return EMBEDDING_ROUTES if self.head == "embed" else CLASSIFIER_ROUTES


def served_routes(pooler: PoolerInfo | None) -> str:
    return GENERATION_ROUTES if pooler is None else pooler.routes()
