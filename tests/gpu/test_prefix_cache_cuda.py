"""The prefix cache and chunked prefill on CUDA: Triton prefill reading cached prefixes through
req_to_token, CUDA-graph decode (queued ahead) after req_to_token writes, int8 KV; the greedy
tokens of an eager engine without cache or chunking (float32)."""

import random

import pytest
import torch
import transformers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from lightllm_plugin.config import EngineConfig  # noqa: E402
from lightllm_plugin.engine.core import EngineCore  # noqa: E402
from lightllm_plugin.sampling_params import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("llama_cache")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _engine(model_dir, **kw):
    cfg = EngineConfig(model_dir=model_dir, device="cuda", data_type="float32", max_total_token_num=3000,
                       max_req_total_len=1024, max_req_input_len=900, **kw)
    return EngineCore(cfg, progress=False, with_tokenizer=False)


def _workload(seed):
    rng = random.Random(seed)
    system = [rng.randrange(4096) for _ in range(400)]
    work = []
    for rid in range(24):
        ids = system[: rng.choice([0, 100, 400])] + [rng.randrange(4096) for _ in range(rng.randrange(1, 200))]
        work.append((rid, ids, SamplingParams(temperature=0, max_new_tokens=rng.randrange(4, 40), ignore_eos=True)))
    return work


def _run(engine, work):
    for w in work:
        engine.add_request(*w)
    got: dict[int, list[int]] = {}
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        for ev in engine.step():
            got.setdefault(ev.req_id, []).append(ev.token_id)
    assert not engine.has_unfinished()
    return got


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_cache_and_chunks_with_graphs_give_the_tokens_of_eager_runs_without_them(model_dir, kv_cache_dtype):
    work = _workload(0)
    reference = _run(_engine(model_dir, kv_cache_dtype=kv_cache_dtype, enforce_eager=True,
                             disable_dynamic_prompt_cache=True, disable_chunked_prefill=True), work)
    engine = _engine(model_dir, kv_cache_dtype=kv_cache_dtype, chunked_prefill_size=96)
    assert engine.runner.decode_graphs is not None
    first = _run(engine, work)
    # the next turn of every conversation: its prompt and answer resent, plus a new message
    follow = [(100 + rid, ids + first[rid] + [7, 8, 9], p) for rid, ids, p in work]
    reference_follow = _run(_engine(model_dir, kv_cache_dtype=kv_cache_dtype, enforce_eager=True,
                                    disable_dynamic_prompt_cache=True, disable_chunked_prefill=True), follow)
    hits = engine.cache_hit_tokens
    assert first == reference
    assert _run(engine, follow) == reference_follow
    assert engine.cache_hit_tokens - hits >= sum(len(ids) for _, ids, _ in work)
    assert engine.steps_queued_ahead > 0
    engine.flush_cache()
    assert engine.free_slots.num_free == engine.total_slots
