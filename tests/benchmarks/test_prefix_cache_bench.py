"""benchmarks/prefix_cache.py's offline workloads at toy sizes, on a tiny random model on the CPU."""

import math

# benchmarks/ is on sys.path through pyproject's pytest `pythonpath`, as for serving.py's test
import prefix_cache as pc
import pytest


def toy_args(*flags: str):
    return pc.parse_args(["--device", "cpu", "--shape", "tiny", *flags])


@pytest.fixture(scope="module")
def source():
    return pc.ModelSource("cpu", shape="tiny")


def test_shared_requests_read_the_prefix_from_the_cache(source):
    args = toy_args("--num_requests", "6", "--prefix_len", "40", "--unique_len", "4", "--max_new_tokens", "3")
    rows = pc.bench_shared(source, args)["rows"]
    on, off = rows["cache on"], rows["cache off"]
    assert on["prompt_tokens"] == off["prompt_tokens"] == 6 * 44
    assert off["cached_tokens"] == 0
    assert on["cached_tokens"] >= 5 * 40  # all but the first request share the computed prefix


def test_longprompt_times_every_chunk_size_and_unchunked(source):
    args = toy_args("--streams", "3", "--stream_prompt_len", "8", "--long_len", "96", "--chunk_sizes", "16,48")
    rows = pc.bench_longprompt(source, args)["rows"]
    assert list(rows) == ["chunked 16", "chunked 48", "not chunked"]
    assert rows["not chunked"]["prefill_steps"] == 1
    assert rows["chunked 16"]["prefill_steps"] >= 96 // 16 - 1
    for r in rows.values():
        assert r["window_gaps"] >= 3 and math.isfinite(r["ratio"]) and r["ttft_s"] > 0


def test_word_chat_template_renders_one_known_token_a_word():
    tok = pc.word_tokenizer(2048)
    tok.chat_template = pc.WORD_CHAT_TEMPLATE
    words = [f"w{i}" for i in range(6, 2000)]
    system, users = pc.conversation_script(words, 1, 2, 10, 3, seed=0)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": users[0][0]},
                {"role": "assistant", "content": "w9 w10"}, {"role": "user", "content": users[0][1]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.split()) == 10 + 3 + 2 + 3 + 4 * 3 + 2  # contents, 3 markers a message, the reply prompt
    assert tok.unk_token_id not in ids
