"""A mixture-of-experts model through the engine on CPU: split over two ranks (each expert's
columns, as the dense MLP's) it gives the greedy tokens of the whole model, with the prefix cache
and chunked prefill on, and no slot leaks."""

import dataclasses
import socket

import pytest
import torch
import transformers

from lightllm_plugin import LLM, SamplingParams
from lightllm_plugin.models.loader import read_hf_config
from lightllm_plugin.models.model_config import ModelConfig
from lightllm_plugin.models.tensor_parallel import plan_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory):
    """Odd expert and shared-expert widths (uneven splits), a dense layer among the sparse ones."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      num_experts=6, num_experts_per_tok=2, moe_intermediate_size=37,
                                      shared_expert_intermediate_size=45, mlp_only_layers=[1])
    model = transformers.Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p) * 0.5)  # decisive routing
    path = tmp_path_factory.mktemp("qwen2moe")
    model.save_pretrained(path)
    return str(path)


def test_every_expert_column_has_exactly_one_owner(tiny_qwen2_moe):
    cfg = ModelConfig.from_hf_dict(read_hf_config(tiny_qwen2_moe))
    for world in (2, 4):
        shards = [plan_shard(cfg, r, world) for r in range(world)]
        assert [i for s in shards for i in range(*s.moe_intermediate)] == list(range(37))
        assert [i for s in shards for i in range(*s.shared_intermediate)] == list(range(45))


def _greedy_tokens(model, tp, prompts, max_tokens, **config):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(model, tp=tp, data_type="float32", nccl_port=_free_port(), max_total_token_num=2048,
             max_req_total_len=256, max_req_input_len=160, progress=False, **config) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.used_slots == llm.engine.cached_slots
        return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
def test_split_two_ways_gives_the_greedy_tokens_of_the_whole_model(tiny_qwen2_moe):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1001, (n,), generator=g).tolist() for n in (1, 9, 90)]
    prompts += [prompts[2], prompts[2][:70] + prompts[1]]  # cached prefixes
    whole = _greedy_tokens(tiny_qwen2_moe, 1, prompts, 16, disable_dynamic_prompt_cache=True,
                           disable_chunked_prefill=True)
    assert _greedy_tokens(tiny_qwen2_moe, 2, prompts, 16, chunked_prefill_size=32) == whole


def test_the_pool_is_sized_beside_the_experts_workspace(tiny_qwen2_moe):
    """The KV pool's sizing sets aside the fused kernel's scratch for the largest forward: a
    workspace larger than free memory leaves the smallest pool, and a dense model sets none aside."""
    from lightllm_plugin.engine.memory import free_memory_bytes, profiled_slot_count
    from lightllm_plugin.models.moe import moe_workspace_bytes

    cfg = ModelConfig.from_hf_dict(read_hf_config(tiny_qwen2_moe))
    tokens = 16384
    # routing, sorting and two [T*k, width] activations of the experts
    assert moe_workspace_bytes(cfg, tokens, torch.bfloat16) >= tokens * 2 * (37 + 64) * 2
    assert moe_workspace_bytes(dataclasses.replace(cfg, sparse_layers=()), tokens, torch.bfloat16) == 0
    cpu = torch.device("cpu")
    assert profiled_slot_count(cpu, 1.0, 1024, 10**9, reserve_bytes=2 * free_memory_bytes(cpu)) == 1


def test_int8_kv_gives_the_float_kv_greedy_tokens(tiny_qwen2_moe):
    """The MoE block never touches the KV pool: an int8 pool serves the model unchanged (on this
    model with decisive routing its greedy tokens are float32's)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1001, (n,), generator=g).tolist() for n in (5, 40, 90)]
    full = _greedy_tokens(tiny_qwen2_moe, 1, prompts, 12)
    assert _greedy_tokens(tiny_qwen2_moe, 1, prompts, 12, kv_cache_dtype="int8") == full
