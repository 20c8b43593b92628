"""What the int8 KV tests on CPU (tests/engine) and GPU (tests/gpu) share: the chats whose greedy
tokens are compared, and perplexity of a fixed text through the engine's own prefill."""

import math
import os

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colours.",
    "Explain in one sentence why the sky is blue.",
    "Give me a tip for learning to cook.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Hamlet?",
    "Describe a cat to someone who has never seen one.",
]
GREEDY_TOKENS = 16
# original prose written for these tests
TEXT = os.path.join(os.path.dirname(__file__), os.pardir, "data", "perplexity_text.txt")
PPL_TOKENS = 2000


def text_ids(llm) -> list[int]:
    """The first PPL_TOKENS tokens of TEXT."""
    with open(TEXT, encoding="utf-8") as fh:
        ids = llm.get_tokenizer().encode(fh.read())[:PPL_TOKENS]
    assert len(ids) == PPL_TOKENS
    return ids


def perplexity(llm, ids: list[int]) -> float:
    """Teacher-forced through the engine's prefill in chunks of 512, so 3/4 of the tokens read
    earlier chunks' K/V back from the pool (quantized, with an int8 pool)."""
    engine = llm.engine
    slots = engine.free_slots.allocate(len(ids))
    try:
        logprobs = engine.runner.teacher_forced_logprobs(ids, slots, chunk=512)
    finally:
        engine.free_slots.free(slots)
    return math.exp(-logprobs.double().mean().item())
