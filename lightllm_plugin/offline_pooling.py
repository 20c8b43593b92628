"""The offline API's pooling calls, shaped like vLLM's: `LLM.embed`, `.classify`, `.reward`, `.score`.

Each prompt is one prefill-only engine request; all of them are queued at once, so the engine
batches them as the server does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from lightllm_plugin.pooling_params import (
    PoolerInfo,
    check_dimensions,
    class_probs,
    cosine,
    served_routes,
    sigmoid,
    truncate_embedding,
)
from lightllm_plugin.sampling_params import SamplingParams


@dataclass
class PoolingOutput:
    data: list[float]  # what the engine pooled: the embedding, or the score head's logits


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class ClassificationOutput:
    probs: list[float]  # softmax over the labels (sigmoid for one label)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingRequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: Any  # one of the outputs above
    finished: bool = True


def _need(pooler: PoolerInfo | None, call: str, head: str | None) -> PoolerInfo:
    if pooler is None:
        raise ValueError(f"LLM.{call} needs a pooling model; this one generates (its calls: generate, chat). "
                         f"LLM(model, task='embed') pools a causal LM's last hidden state")
    if head is not None and pooler.head != head:
        raise ValueError(f"LLM.{call} needs a {'score head' if head == 'classify' else 'embedding model'}; this model "
                         f"is {pooler.described()} (its routes: {served_routes(pooler)})")
    return pooler


def _token_ids(tokenizer, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tokenizer.encode(p))
        elif isinstance(p, dict) and "prompt_token_ids" in p:
            out.append(list(p["prompt_token_ids"]))
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            out.append(list(p))
        else:
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
    return out


def pool(engine, id_lists: list[list[int]], use_tqdm: bool = True) -> list[list[float]]:
    """Each prompt's pooled vector, in order."""
    params = SamplingParams(max_new_tokens=1)
    for ids in id_lists:
        engine.validate(ids, params)
    req_ids = []
    for ids in id_lists:
        req_ids.append(engine.new_request_id())
        engine.add_request(req_ids[-1], ids, params)
    results: dict[int, list[float]] = {}
    bar = tqdm(total=len(req_ids), desc="Pooling", unit="req", disable=not use_tqdm)
    try:
        while engine.has_unfinished():
            for event in engine.step():
                results[event.req_id] = event.data
                bar.update(1)
    finally:
        bar.close()
        for req_id in req_ids:  # an exception mid-run must not leak slots
            if req_id not in results:
                engine.abort(req_id)
    return [results[r] for r in req_ids]


def embed(llm, prompts, dimensions: int | None = None, use_tqdm: bool = True) -> list[PoolingRequestOutput]:
    pooler = _need(llm.engine.pooler, "embed", "embed")
    check_dimensions(pooler, dimensions)
    ids = _token_ids(llm.tokenizer, prompts)
    return [PoolingRequestOutput(i, p, EmbeddingOutput(truncate_embedding(pooler, v, dimensions)))
            for i, (p, v) in enumerate(zip(ids, pool(llm.engine, ids, use_tqdm)))]


def classify(llm, prompts, use_tqdm: bool = True) -> list[PoolingRequestOutput]:
    _need(llm.engine.pooler, "classify", "classify")
    ids = _token_ids(llm.tokenizer, prompts)
    return [PoolingRequestOutput(i, p, ClassificationOutput(class_probs(v)))
            for i, (p, v) in enumerate(zip(ids, pool(llm.engine, ids, use_tqdm)))]


def reward(llm, prompts, use_tqdm: bool = True) -> list[PoolingRequestOutput]:
    """The raw outputs of the pooler (a reward model's score is its one logit)."""
    _need(llm.engine.pooler, "reward", None)
    ids = _token_ids(llm.tokenizer, prompts)
    return [PoolingRequestOutput(i, p, PoolingOutput(v)) for i, (p, v) in enumerate(zip(ids, pool(llm.engine, ids, use_tqdm)))]


def pair_ids(tokenizer, text_1: str, text_2: str) -> list[int]:
    """A cross-encoder's input: the two texts as the tokenizer encodes a pair."""
    return list(tokenizer(text_1, text_pair=text_2)["input_ids"])


def score(llm, text_1: str | Sequence[str], text_2: str | Sequence[str], use_tqdm: bool = True) -> list[PoolingRequestOutput]:
    """vLLM's pairing: one text_1 against many text_2, or as many of each, pair by pair. An
    embedding model scores the cosine of the two embeddings; a score head (one label) scores
    the pair encoded together, through a sigmoid."""
    pooler = _need(llm.engine.pooler, "score", None)
    firsts = [text_1] if isinstance(text_1, str) else list(text_1)
    seconds = [text_2] if isinstance(text_2, str) else list(text_2)
    if not firsts or not seconds:
        raise ValueError("text_1 and text_2 must not be empty")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ValueError(f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: give one text_1, or as many as text_2")
    tokenizer = llm.tokenizer
    if pooler.head == "embed":
        ids = [tokenizer.encode(t) for t in firsts + seconds]
        vectors = pool(llm.engine, ids, use_tqdm)
        n = len(firsts)
        scores = [cosine(vectors[i], vectors[n + i]) for i in range(n)]
        prompt_ids = [ids[i] + ids[n + i] for i in range(n)]
    else:
        if pooler.dimensions != 1:
            raise ValueError(f"LLM.score needs a score head of one label; this one has {pooler.dimensions}")
        prompt_ids = [pair_ids(tokenizer, a, b) for a, b in zip(firsts, seconds)]
        scores = [sigmoid(v[0]) for v in pool(llm.engine, prompt_ids, use_tqdm)]
    return [PoolingRequestOutput(i, p, ScoringOutput(s)) for i, (p, s) in enumerate(zip(prompt_ids, scores))]
