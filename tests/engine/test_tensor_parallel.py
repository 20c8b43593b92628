"""Tensor parallelism on CPU (gloo): how a model is split, and that the split model answers
exactly as the whole one does, offline and through the server."""

import socket
import time

import pytest
import torch
import transformers

from lightllm_plugin import LLM, SamplingParams
from lightllm_plugin.models.model_config import ModelConfig
from lightllm_plugin.models.tensor_parallel import plan_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_cfg(heads, kv_heads, inter=64, vocab=100):
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=heads * 8,
                       intermediate_size=inter, num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=8,
                       rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=False,
                       qkv_bias=False, o_bias=False, qk_norm=False)


@pytest.mark.parametrize("heads,kv_heads,world", [(9, 3, 2), (8, 2, 2), (8, 2, 4), (8, 8, 3), (4, 1, 4), (32, 8, 8)])
def test_every_head_column_and_vocab_row_has_exactly_one_owner_and_each_query_head_keeps_its_kv_head(
        heads, kv_heads, world):
    cfg = _model_cfg(heads, kv_heads, inter=65, vocab=101)
    shards = [plan_shard(cfg, r, world) for r in range(world)]
    q_owned = [h for s in shards for h in range(*s.q_heads)]
    assert q_owned == list(range(heads))
    assert [i for s in shards for i in range(*s.intermediate)] == list(range(65))
    assert [v for s in shards for v in range(*s.vocab)] == list(range(101))
    assert all(s.vocab_block * world >= 101 and s.vocab[1] - s.vocab[0] <= s.vocab_block for s in shards)
    group = heads // kv_heads
    for s in shards:
        assert s.q_heads[1] > s.q_heads[0] and s.kv_heads[1] > s.kv_heads[0]
        # the rank holds the KV head of every query head it holds, in the same order
        assert [h // group for h in range(*s.q_heads)] == [
            k for k in range(*s.kv_heads) for _ in range(min(group, s.q_heads[1] - s.q_heads[0]))
        ]
    if kv_heads < world:  # replicated: the ranks sharing a KV head split its query heads
        assert sorted(s.kv_heads for s in shards) == sorted((k, k + 1) for k in range(kv_heads) for _ in range(world // kv_heads))


@pytest.mark.parametrize("heads,kv_heads,world", [(4, 1, 3), (6, 2, 4)])
def test_a_split_that_cannot_keep_query_heads_with_their_kv_head_is_refused(heads, kv_heads, world):
    with pytest.raises(ValueError, match=f"tp={world}"):
        plan_shard(_model_cfg(heads, kv_heads), 0, world)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A random Qwen2 with 2 KV heads (qkv bias), an odd MLP width and an odd vocabulary, so the
    splits are uneven and the vocabulary blocks padded."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=1001, hidden_size=128, intermediate_size=343, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("qwen2")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _greedy_tokens(model, tp, prompts, max_tokens, chat=False, **config):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    threads = torch.get_num_threads()
    # float32: the split sums the same products in another order, exact only in float32
    with LLM(model, tp=tp, data_type="float32", nccl_port=_free_port(), max_total_token_num=4096,
             max_req_total_len=512, max_req_input_len=256, progress=False, **config) as llm:
        if chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.used_slots == llm.engine.cached_slots
    # rank 0 ran in this process on its share of the cores; closing gives the caller's back
    assert torch.get_num_threads() == threads
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
def test_tiny_qwen2_split_two_and_four_ways_gives_the_greedy_tokens_of_the_whole_model(tiny_qwen2):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1001, (n,), generator=g).tolist() for n in (1, 7, 60, 130)]
    # a repeated prompt and one sharing 100 tokens: the ranks read the same cached prefix, which
    # reaches them as req_to_token writes in the step plan, and the 130-token prompts go in chunks
    prompts += [prompts[3], prompts[3][:100] + prompts[2][:20]]
    whole = _greedy_tokens(tiny_qwen2, 1, prompts, 24, disable_dynamic_prompt_cache=True, disable_chunked_prefill=True)
    assert _greedy_tokens(tiny_qwen2, 2, prompts, 24, chunked_prefill_size=48) == whole
    # 4 ranks over 2 KV heads: each KV head held by two ranks
    assert _greedy_tokens(tiny_qwen2, 4, prompts, 24) == whole


CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Who wrote Hamlet?",
         "List three colours."]


@pytest.mark.slow
def test_default_model_split_two_ways_gives_the_greedy_tokens_of_the_whole_model():
    # 9 query heads over 3 KV heads: the ranks hold 6 + 3
    whole = _greedy_tokens(None, 1, CHATS, 24, chat=True)
    assert _greedy_tokens(None, 2, CHATS, 24, chat=True) == whole


def test_a_failed_start_stops_the_other_ranks(tiny_qwen2):
    # every rank fails to split 4 query heads over 2 KV heads 3 ways; none is left running
    from multiprocessing import resource_tracker

    import psutil

    # the first spawn starts multiprocessing's resource tracker, which lives as long as this process:
    # start it first, so that it is not taken for a rank left behind (run alone or with -m "not slow")
    resource_tracker.ensure_running()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="tp=3"):
        LLM(tiny_qwen2, tp=3, nccl_port=_free_port(), max_total_token_num=1024, max_req_total_len=256,
            max_req_input_len=128, progress=False)
    time.sleep(0.5)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    assert not left, left
