"""What a model without a sampler returns, described for every process.

The router resolves it once from the checkpoint (models/pooling_config.py) and reports it in its
Ready message, so the api process, which never loads the model, knows which routes to serve and
what the engine's vectors mean.
"""

from __future__ import annotations

import math

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

    def described(self) -> str:
        """What the served model is, for messages: "a reward model (--task reward)"."""
        what = {"reward": "a reward model", "embed": "an embedding model", "classify": "a classifier",
                "score": "a scoring model"}[self.task]
        return f"{what} (--task {self.task})"

    def routes(self) -> str:
        return EMBEDDING_ROUTES if self.head == "embed" else CLASSIFIER_ROUTES


def served_routes(pooler: PoolerInfo | None) -> str:
    return GENERATION_ROUTES if pooler is None else pooler.routes()


# ---- what the vectors become: shared by the offline API and the server's routes -------------
def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def class_probs(logits: list[float]) -> list[float]:
    """vLLM's classifier activation: sigmoid for one label, softmax over several."""
    return [sigmoid(logits[0])] if len(logits) == 1 else softmax(logits)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def check_dimensions(pooler: PoolerInfo, dimensions: int | None) -> None:
    """ValueError naming `dimensions` unless the model was trained for that truncation."""
    if dimensions is None:
        return
    if not (pooler.is_matryoshka or pooler.matryoshka_dimensions):
        raise ValueError("dimensions is not supported: the model's config declares no Matryoshka dimensions "
                         "(matryoshka_dimensions or is_matryoshka)")
    if dimensions < 1 or dimensions > pooler.dimensions:
        raise ValueError(f"dimensions must be between 1 and the model's {pooler.dimensions}, got {dimensions}")
    if pooler.matryoshka_dimensions and not pooler.is_matryoshka and dimensions not in pooler.matryoshka_dimensions:
        raise ValueError(f"dimensions must be one of the model's Matryoshka dimensions "
                         f"{pooler.matryoshka_dimensions}, got {dimensions}")


def truncate_embedding(pooler: PoolerInfo, vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` values, normalized again where the model's vectors are."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    if not pooler.normalize:
        return head
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]
