"""Pooling models on CUDA: the Triton prefill path, chunked prompts and the prefix cache give the
scores, class logits and embeddings transformers gives (float32 on the CPU), over a batch of
prompts of different lengths: float32 within 1e-3, bfloat16 within 3e-2 relative."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from support.pooling_models import HFReference, build_pooling_folder, rel_err  # noqa: E402

from lightllm_plugin.config import EngineConfig  # noqa: E402
from lightllm_plugin.engine.core import EngineCore  # noqa: E402
from lightllm_plugin.sampling_params import SamplingParams  # noqa: E402

VOCAB = 512


CASES = [(kind, "bfloat16", 3e-2) for kind in ("llama_reward", "mistral_classifier", "qwen3_embed_last",
                                               "llama_embed_mean")]
CASES += [("qwen2_classifier", "float32", 1e-3), ("llama_embed_mean", "float32", 1e-3)]


@pytest.mark.parametrize("kind, dtype, tol", CASES)
def test_pooling_on_cuda_matches_hf(kind, dtype, tol, tmp_path):
    folder = build_pooling_folder(tmp_path, kind, vocab_size=VOCAB)
    ref = HFReference(folder, kind)
    config = EngineConfig(model_dir=folder, device="cuda", data_type=dtype, max_total_token_num=4096,
                          max_req_total_len=512, max_req_input_len=480, batch_max_tokens=128)
    core = EngineCore(config, progress=False, with_tokenizer=False)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 17, 128, 129, 300, 450, 5, 64)]
    prompts.append(prompts[4] + prompts[1])  # shares a cached prefix (last-token pooling)
    for round_ in range(2):  # the second round reads the prompts from the prefix cache
        first = core.new_request_id()
        for i, ids in enumerate(prompts):
            core.add_request(first + i, ids, SamplingParams(max_new_tokens=1))
        got = {}
        for _ in range(500):
            if not core.has_unfinished():
                break
            for event in core.step():
                got[event.req_id - first] = event.data
        # ||ours - ref|| / ||ref|| over the whole batch of outputs: one reward of one prompt is a
        # single number near 0, whose own relative error in bfloat16 says little
        ours = torch.tensor([got[i] for i in range(len(prompts))])
        assert rel_err(ours, torch.stack([ref(ids) for ids in prompts])) < tol, round_
    core.flush_cache()
    assert core.free_slots.num_free == core.total_slots
