"""Incremental detokenization and stop strings, with the default model's real tokenizer."""

import pytest

from lightllm_plugin.engine.outputs import TokenEvent
from lightllm_plugin.server.detokenizer import Detokenizer
from lightllm_plugin.server.protocol import DetokenizeForget, DetokenizeStart, TokenBatch
from lightllm_plugin.text_stream import IncrementalDetokenizer, StopStringMatcher

MULTIBYTE_TEXT = "héllo 你好 😀 world, the capital of France is Paris. 東京 🙂🙂 ok"


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm_plugin.models.tokenizer import load_tokenizer

    return load_tokenizer(None)


def test_pieces_concatenate_to_the_full_decode_and_never_split_a_character(tokenizer):
    ids = tokenizer.encode(MULTIBYTE_TEXT)
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    pieces = [detok.push(t, final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == MULTIBYTE_TEXT
    assert all("\ufffd" not in p for p in pieces)
    # the emoji takes several byte tokens: the first ones release nothing
    assert "" in pieces


def test_prompt_context_is_not_repeated_and_special_tokens_are_skipped(tokenizer):
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    ids = tokenizer.encode("Paris is nice.") + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    text = "".join(detok.push(t, final=(i == len(ids) - 1)) for i, t in enumerate(ids))
    assert text == "Paris is nice."
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=False)
    text = "".join(detok.push(t) for t in ids)
    assert text == "Paris is nice." + tokenizer.eos_token


def test_a_final_token_ending_mid_character_is_flushed(tokenizer):
    ids = tokenizer.encode("ok 😀")
    cut = ids[:-1]  # the emoji's last byte never comes (max_new_tokens ran out)
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    text = "".join(detok.push(t, final=(i == len(cut) - 1)) for i, t in enumerate(cut))
    assert text == tokenizer.decode(cut)


@pytest.mark.parametrize(
    "pieces, stops, released, stopped",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["The capital", " is Par", "is."], ["Paris"], "The capital is ", True),
        (["ab", "c"], ["x"], "abc", False),
        (["a<", "|", "end"], ["<|end|>"], "a<|end", False),  # held back, released at the end
        (["one two three"], ["three", "two"], "one ", True),  # the earliest stop wins
        (["xy"], ["y", "xy"], "", True),
    ],
)
def test_stop_strings_cut_exactly_before_the_stop(pieces, stops, released, stopped):
    matcher = StopStringMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (released, stopped)


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_be_one():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.feed("a</") == ("a", False)
    assert matcher.feed("b") == ("</b", False)


def _event(req_id, token, output_len, finish=None):
    return TokenEvent(req_id, token, -0.5, None, finish, output_len, 3)


def test_detokenizer_routes_events_and_reports_stop_string_hits(tokenizer):
    detok = Detokenizer(tokenizer)
    detok.handle(DetokenizeStart(req_id=1, prompt_tail=[], stop=["Paris"], skip_special_tokens=True), [], [])
    detok.handle(DetokenizeStart(req_id=2, prompt_tail=[], stop=[], skip_special_tokens=True), [], [])
    detok.handle(DetokenizeStart(req_id=3, prompt_tail=[], stop=[], skip_special_tokens=True), [], [])
    detok.handle(DetokenizeForget(req_ids=[3]), [], [])
    ids = tokenizer.encode("It is Paris, yes")
    outputs, stops = [], []
    for n, t in enumerate(ids, 1):
        events = [_event(1, t, n), _event(2, t, n, "length" if n == len(ids) else None), _event(3, t, n)]
        detok.handle(TokenBatch(events=events), outputs, stops)
    assert stops == [1]
    text1 = "".join(o.text for o in outputs if o.req_id == 1)
    assert text1 == "It is "
    assert [o.finish_reason for o in outputs if o.req_id == 1][-1] == "stop"
    assert "".join(o.text for o in outputs if o.req_id == 2) == "It is Paris, yes"
    assert not any(o.req_id == 3 for o in outputs)
    assert detok.requests == {}


def test_token_strings_come_with_top_logprobs_only(tokenizer):
    detok = Detokenizer(tokenizer)
    detok.handle(DetokenizeStart(req_id=1, prompt_tail=[], stop=[], skip_special_tokens=True), [], [])
    paris, london = tokenizer.encode(" Paris"), tokenizer.encode(" London")
    outputs = []
    top = [(paris[0], -0.1), (london[0], -2.5)]
    batch = [TokenEvent(1, paris[0], -0.1, top, None, 1, 3), _event(1, tokenizer.eos_token_id, 2, "stop")]
    detok.handle(TokenBatch(events=batch), outputs, [])
    assert outputs[0].logprob_tokens == [" Paris", " Paris", " London"]
    assert outputs[1].logprob_tokens is None  # no top alternatives asked for: nothing rendered
