"""Pooling requests (reward, classifier, embedding) through the engine, against Hugging Face.

Tiny random models of each kind are saved as folders; the engine's scores, class logits and
embeddings must match transformers' within 1e-4 relative, one prompt alone and many prompts of
different lengths at once (batched together, long ones prefilled in chunks, which mean pooling
must add up), repeated prompts read from the prefix cache; afterwards every KV slot is free.
"""

import pytest
import torch
from support.pooling_models import KINDS, HFReference, build_pooling_folder, rel_err

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.core import EngineCore
from lightllm_plugin.sampling_params import SamplingParams

VOCAB = 384
TOL = 1e-4


def run(core: EngineCore, prompts: list[list[int]]) -> dict[int, object]:
    first = core.new_request_id()
    for i, ids in enumerate(prompts):
        core.add_request(first + i, ids, SamplingParams(max_new_tokens=1))
    events = {}
    for _ in range(1000):
        if not core.has_unfinished():
            break
        for event in core.step():
            events[event.req_id - first] = event
    assert not core.has_unfinished()
    return [events[i] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pooling_matches_hf(kind, tmp_path):
    folder = build_pooling_folder(tmp_path, kind, vocab_size=VOCAB)
    ref = HFReference(folder, kind)
    # a batch of 64 tokens: prompts over it are prefilled in chunks, several short ones share a step
    config = EngineConfig(model_dir=folder, max_total_token_num=2048, max_req_total_len=512, max_req_input_len=400,
                          batch_max_tokens=64)
    core = EngineCore(config, progress=False, with_tokenizer=False)
    num_labels = KINDS[kind][1]
    assert config.resolved_task == ("embed" if not num_labels else "reward" if num_labels == 1 else "classify")
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 7, 33, 64, 65, 150, 3, 20, 90, 300]
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    expected = [ref(ids) for ids in prompts]

    alone = run(core, prompts[5:6])[0]
    assert rel_err(alone.data, expected[5]) < TOL
    assert alone.prompt_len == lengths[5]
    together = run(core, prompts)
    for i, (event, want) in enumerate(zip(together, expected)):
        assert len(event.data) == (num_labels or 64)
        assert rel_err(event.data, want) < TOL, f"prompt {i} ({lengths[i]} tokens)"
    # the same prompts again, plus ones sharing a prefix: last-token pooling reads the cache
    again = run(core, prompts + [prompts[8] + prompts[1]])
    for event, want in zip(again, expected + [ref(prompts[8] + prompts[1])]):
        assert rel_err(event.data, want) < TOL
    if KINDS[kind][2] == "mean_tokens":
        assert core.prefix_cache is None  # cached prefixes have no hidden states to average
    else:
        assert again[9].cached_len == lengths[9] - 1 and again[-1].cached_len == lengths[8]
    core.flush_cache()
    assert core.free_slots.num_free == core.total_slots
    assert core.num_running == core.num_waiting == 0


def test_task_checks(tmp_path):
    reward = build_pooling_folder(tmp_path / "reward", "llama_reward", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="--task reward"):
        EngineCore(EngineConfig(model_dir=reward, task="generate", max_total_token_num=1024), progress=False,
                   with_tokenizer=False)
    embed = build_pooling_folder(tmp_path / "embed", "qwen3_embed_last", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="score head"):
        EngineCore(EngineConfig(model_dir=embed, task="reward", max_total_token_num=1024), progress=False,
                   with_tokenizer=False)
    # a reward model served as an embedding model pools its last hidden state
    core = EngineCore(EngineConfig(model_dir=reward, task="embed", max_total_token_num=1024, max_req_total_len=512,
                                   max_req_input_len=400), progress=False, with_tokenizer=False)
    import transformers

    hf = transformers.AutoModel.from_pretrained(reward, dtype=torch.float32).eval()
    ids = list(range(5, 45))
    with torch.no_grad():
        want = torch.nn.functional.normalize(hf(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)
    (event,) = run(core, [ids])
    assert len(event.data) == 64 and rel_err(event.data, want) < TOL


def test_an_aborted_pooling_request_mid_prompt_frees_its_slots(tmp_path):
    folder = build_pooling_folder(tmp_path, "llama_embed_mean", vocab_size=VOCAB)
    core = EngineCore(EngineConfig(model_dir=folder, max_total_token_num=1024, max_req_total_len=512,
                                   max_req_input_len=400, batch_max_tokens=32), progress=False, with_tokenizer=False)
    core.add_request(1, list(range(3, 203)), SamplingParams(max_new_tokens=1))  # 200 tokens: 7 chunks
    core.add_request(2, list(range(3, 13)), SamplingParams(max_new_tokens=1))
    assert core.step() == [] and core.used_slots == 32  # the first chunk of request 1
    assert core.abort(1)
    (event,) = [e for _ in range(3) for e in core.step()]
    assert event.req_id == 2 and not core.has_unfinished()
    assert core.free_slots.num_free == core.total_slots
