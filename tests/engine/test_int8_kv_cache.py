"""The default model with an int8 KV cache against its float32 KV cache, on CPU.

The CPU engine runs the torch references, so this checks the quantize-on-write /
dequantize-on-read path end to end; the Triton kernels are checked against those
references in tests/kernels (interpreter) and tests/gpu.
"""

import pytest
import torch
from support.int8_kv_check import CHATS, GREEDY_TOKENS, PPL_TOKENS, perplexity, text_ids

from lightllm_plugin import LLM, SamplingParams


def _llm(kv_cache_dtype):
    return LLM(data_type="float32", kv_cache_dtype=kv_cache_dtype, max_total_token_num=4096,
               max_req_total_len=2048, max_req_input_len=512, progress=False)


@pytest.fixture(scope="module")
def engines():
    return _llm("auto"), _llm("int8")


def test_the_int8_engine_has_an_int8_pool(engines):
    full, int8 = engines
    assert full.engine.runner.kv_pool.dtype == torch.float32
    assert int8.engine.runner.kv_pool.values.dtype == torch.int8
    assert int8.engine.runner.kv_pool.scales.dtype == torch.float16


def test_int8_greedy_output_equals_float32_kv_output(engines):
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    messages = [[{"role": "user", "content": c}] for c in CHATS]
    full, int8 = (llm.chat(messages, params, use_tqdm=False) for llm in engines)
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(full, int8)]
    print("int8 KV greedy equal to float32 KV over the first 16 tokens:", same)
    assert sum(same) >= 6, [(a.outputs[0].text, b.outputs[0].text) for a, b in zip(full, int8)]
    for llm in engines:
        llm.engine.flush_cache()
        assert llm.engine.free_slots.num_free == llm.config.total_slots  # nothing leaked


@pytest.mark.slow
def test_int8_perplexity_rises_less_than_two_percent(engines):
    full, int8 = engines
    ids = text_ids(full)
    ppl_full, ppl_int8 = perplexity(full, ids), perplexity(int8, ids)
    print(f"perplexity over {PPL_TOKENS} tokens: float32 KV {ppl_full:.4f}, int8 KV {ppl_int8:.4f} "
          f"({100 * (ppl_int8 / ppl_full - 1):+.2f}%)")
    assert ppl_full < 30  # the text and the path are sane: a 135M model reads plain English well
    assert ppl_int8 < 1.02 * ppl_full


def test_teacher_forced_logprobs_do_not_depend_on_the_chunking(engines):
    # the perplexity helper reads earlier chunks back through the pool: chunked and one-shot agree
    full, _ = engines
    ids = full.get_tokenizer().encode("The ferry crosses the river every morning, and the baker rides it.")
    slots = full.engine.free_slots.allocate(len(ids))
    try:
        one = full.engine.runner.teacher_forced_logprobs(ids, slots, chunk=len(ids))
        chunked = full.engine.runner.teacher_forced_logprobs(ids, slots, chunk=3)
    finally:
        full.engine.free_slots.free(slots)
    assert one.shape == (len(ids) - 1,)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=0)
