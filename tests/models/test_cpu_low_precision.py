"""The CPU's bfloat16 path (quantized projections for decode, bfloat16 KV cache) against its
float32 path, on the default model: its greedy output equals float32's on most of the test chats."""

import pytest
import torch
from support.int8_kv_check import CHATS

from lightllm_plugin import LLM, SamplingParams

GREEDY_TOKENS = 32


def _llm(data_type):
    return LLM(data_type=data_type, max_total_token_num=4096, max_req_total_len=1024, max_req_input_len=512,
               progress=False)


@pytest.fixture(scope="module")
def engines():
    return _llm("float32"), _llm("bfloat16")


def test_auto_is_float32_on_cpu_and_bfloat16_keeps_the_4_bit_weights_and_a_bfloat16_kv_cache(engines):
    assert _llm("auto").config.resolved_dtype == "float32"
    full, low = engines
    assert full.config.resolved_dtype == "float32" and full.engine.runner.kv_pool.dtype == torch.float32
    assert low.config.resolved_dtype == "bfloat16"
    assert low.engine.runner.kv_pool.dtype == torch.bfloat16
    # every projection of the Q4_1 file keeps its 4-bit codes; the head stays float32
    layers = low.engine.runner.model.layers
    kinds = {p.kind for layer in layers for p in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)}
    assert kinds == {"int4"}
    assert low.engine.runner.model.lm_head.weight.dtype == torch.float32


def test_greedy_output_equals_float32_on_six_of_eight_chats(engines):
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    messages = [[{"role": "user", "content": c}] for c in CHATS]
    full, low = (llm.chat(messages, params, use_tqdm=False) for llm in engines)
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(full, low)]
    print(f"bfloat16 CPU path greedy equal to float32 over the first {GREEDY_TOKENS} tokens:", same)
    assert sum(same) >= 6, [(a.outputs[0].text, b.outputs[0].text) for a, b in zip(full, low)]
    for llm in engines:
        llm.engine.flush_cache()
        assert llm.engine.free_slots.num_free == llm.config.total_slots
