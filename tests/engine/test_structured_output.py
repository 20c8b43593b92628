"""Structured outputs beside sampling: the token bitmask against plain references, and the
offline LLM on the default model held to JSON schemas, regexes, choices and grammars."""

import re
import threading

import pydantic
import pytest
import torch
import xgrammar

from lightllm_plugin import LLM, SamplingParams
from lightllm_plugin.engine.structured_output import (
    AllowedTokens,
    apply_token_bitmask,
    bitmask_words,
    masked_logits,
    token_bits,
)


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Bit by bit in python: token t is allowed when bit t % 32 of word t // 32 is set."""
    out = logits.clone()
    words = bitmask.tolist()
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not (words[b][t // 32] >> (t % 32)) & 1:
                out[b, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 517, 1024])
def test_bitmask_matches_a_bit_by_bit_reference_and_xgrammar(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for batch in (1, 3):
        logits = torch.randn(batch, vocab, generator=gen)
        bitmask = torch.randint(-(2**31), 2**31, (batch, bitmask_words(vocab)), dtype=torch.int64,
                                generator=gen).to(torch.int32)
        got = logits.clone()
        apply_token_bitmask(got, bitmask)
        want = _reference_mask(logits, bitmask)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # the engine's one-pass copy, as a mask-only step takes it
        torch.testing.assert_close(masked_logits(logits, bitmask, token_bits(logits.device)), want, rtol=0, atol=0)
        if vocab % 32 == 0:
            # xgrammar's own CPU kernel (it corrupts memory on a vocabulary that is not a
            # multiple of 32, one reason the engine unpacks the bits itself)
            theirs = logits.clone()
            xgrammar.apply_token_bitmask_inplace(theirs, bitmask)
            torch.testing.assert_close(got, theirs, rtol=0, atol=0)


def test_allowed_tokens_row_allows_exactly_its_ids():
    vocab = 200
    ids = [0, 5, 31, 32, 63, 64, 199]
    bitmask = torch.zeros(1, bitmask_words(vocab), dtype=torch.int32)
    AllowedTokens(ids + [500], vocab).fill(bitmask, 0)  # an id beyond the vocabulary is ignored
    logits = torch.zeros(1, vocab)
    apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == ids


class Person(pydantic.BaseModel):
    # bounded, so that a sampled answer always fits in max_new_tokens
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=150)


PERSON = Person.model_json_schema()
PROMPTS = ["Describe a person as JSON.", "Invent a character for a story.", "Who is your best friend?"]


@pytest.fixture(scope="module")
def llm():
    with LLM(max_total_token_num=4096, max_req_total_len=1024, max_req_input_len=512, progress=False) as llm:
        yield llm


def _chat(llm, prompt, **params):
    return llm.chat([[{"role": "user", "content": p}] for p in ([prompt] if isinstance(prompt, str) else prompt)],
                    SamplingParams(**params), use_tqdm=False)


def test_json_schema_output_validates_greedy_sampled_and_n(llm):
    outs = _chat(llm, PROMPTS[:2], temperature=0, max_new_tokens=32, structured_outputs={"json": PERSON})
    outs += _chat(llm, PROMPTS[2], temperature=1.0, top_p=0.9, top_k=50, seed=3, n=2, max_new_tokens=32,
                  repetition_penalty=1.1, structured_outputs={"json": PERSON})
    samples = [o for r in outs for o in r.outputs]
    assert len(samples) == 4
    for sample in samples:
        assert sample.finish_reason == "stop", sample.text
        Person.model_validate_json(sample.text)
    # the same prompt again reads its prefix from the cache and is held to the schema all the same
    again = _chat(llm, PROMPTS[0], temperature=0, max_new_tokens=32, structured_outputs={"json": PERSON})[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].text == outs[0].outputs[0].text
    llm.engine.flush_cache()
    assert llm.engine.free_slots.num_free == llm.engine.total_slots


def _grammar_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("grammar-compile", "grammar-mask"))]


def test_close_stops_the_grammar_threads_and_a_later_request_starts_them_again(llm):
    first = _chat(llm, "Say yes or no.", temperature=0, max_new_tokens=4, structured_outputs={"choice": ["yes", "no"]})
    assert first[0].outputs[0].text in ("yes", "no") and _grammar_threads()
    llm.close()
    assert _grammar_threads() == []
    again = _chat(llm, "Say yes or no.", temperature=0, max_new_tokens=4, structured_outputs={"choice": ["yes", "no"]})
    assert again[0].outputs[0].text == first[0].outputs[0].text


def test_regex_choice_grammar_and_allowed_tokens(llm):
    phone = _chat(llm, "What is your phone number?", temperature=0.7, seed=1, max_new_tokens=20,
                  structured_outputs={"regex": r"\d{3}-\d{4}"})[0].outputs[0]
    assert re.fullmatch(r"\d{3}-\d{4}", phone.text)
    answer = _chat(llm, "Is Paris in France?", temperature=0, max_new_tokens=20,
                   structured_outputs={"choice": ["yes", "no", "maybe"]})[0].outputs[0]
    assert answer.text in ("yes", "no", "maybe")
    grammar = 'root ::= "(" num " " op " " num ")"\nnum ::= [0-9]+\nop ::= "+" | "-"'
    expr = _chat(llm, "Write a sum.", temperature=0, max_new_tokens=20, structured_outputs={"grammar": grammar})
    text = expr[0].outputs[0].text
    assert re.fullmatch(r"\((\d+) ([+-]) (\d+)\)", text), text
    allowed = llm.tokenizer.encode(" yes no", add_special_tokens=False)
    out = _chat(llm, "Hi", temperature=1.0, seed=0, max_new_tokens=6, ignore_eos=True, allowed_token_ids=allowed)
    assert set(out[0].outputs[0].token_ids) <= set(allowed)


def test_a_grammar_that_cannot_finish_ends_with_length(llm):
    out = _chat(llm, PROMPTS[0], temperature=0, max_new_tokens=4, structured_outputs={"json": PERSON})[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    llm.engine.flush_cache()
    assert llm.engine.free_slots.num_free == llm.engine.total_slots


def test_min_new_tokens_gives_way_to_a_complete_grammar(llm):
    # the object is complete after a few tokens and only a stop token may follow it; masking the
    # stop for min_new_tokens as well would leave no token at all (the row sampled token 0)
    plain = _chat(llm, PROMPTS[0], temperature=0, max_new_tokens=48, structured_outputs={"json": PERSON})[0]
    held = _chat(llm, PROMPTS[0], temperature=0, max_new_tokens=48, min_new_tokens=40,
                 structured_outputs={"json": PERSON})[0]
    for out in (plain.outputs[0], held.outputs[0]):
        assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.config.resolved_eos_ids, out.token_ids
        Person.model_validate_json(out.text)
    assert held.outputs[0].token_ids == plain.outputs[0].token_ids


class _RefusingCompiler:
    """In place of xgrammar's compiler: refuses a grammar its parser took (no spec found that
    xgrammar 0.2.9 parses and then fails to compile; the library's own message shape)."""

    def compile_grammar(self, grammar):
        raise RuntimeError("[12:00:00] /project/cpp/grammar_compiler.cc:1: out of memory")


def test_a_grammar_that_does_not_compile_ends_the_request_with_its_error(llm, monkeypatch):
    monkeypatch.setattr(llm.engine._grammars(), "_compiler", _RefusingCompiler())
    with pytest.raises(ValueError, match=r"^structured_outputs: the regex could not be compiled: out of memory$"):
        _chat(llm, ["Hi", "Hello"], max_new_tokens=4, structured_outputs={"regex": "[a-z]{3}q"})
    assert not llm.engine.has_unfinished()
    llm.engine.flush_cache()
    assert llm.engine.free_slots.num_free == llm.engine.total_slots


@pytest.mark.parametrize("spec, problem", [
    ({"regex": "(("}, "structured_outputs: invalid regex"),
    ({"json": {"type": "foo"}}, "structured_outputs: invalid JSON schema"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs: invalid grammar"),
    ({"json": PERSON, "regex": "a"}, "exactly one of"),
])
def test_bad_constraints_are_refused_before_anything_runs(llm, spec, problem):
    with pytest.raises(ValueError, match=problem):
        _chat(llm, "Hi", max_new_tokens=4, structured_outputs=spec)
    assert not llm.engine.has_unfinished()
