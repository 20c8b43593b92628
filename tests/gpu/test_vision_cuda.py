"""Qwen2-VL, Qwen2.5-VL (eager decode) and LLaVA (decode under CUDA graphs) on CUDA: float32 greedy tokens of
chats with images equal transformers' generate on the CPU, several image requests in one step
(one batched vision step) give each request's own tokens, and the bfloat16 vision tower stays
within 3e-2 relative of transformers' float32 one."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from support.hf_match import relative_error  # noqa: E402
from support.vision_models import ALL_KINDS, HFVisionReference, build_folder, data_url, png_bytes  # noqa: E402

from lightllm_plugin import LLM, SamplingParams  # noqa: E402

IMAGES = [png_bytes(56, 56, seed=1), png_bytes(112, 84, seed=2), png_bytes(84, 112, seed=3)]


def chat(png: bytes, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_vision_language_on_cuda_matches_hf(kind, tmp_path):
    folder = build_folder(tmp_path, kind)
    hf = HFVisionReference(folder)
    llm = LLM(folder, device="cuda", data_type="float32", max_total_token_num=4096, max_req_total_len=512,
              max_req_input_len=256, progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    chats = [chat(png, "What is in this picture?") for png in IMAGES]
    together = [out.outputs[0].token_ids for out in llm.chat(chats, params, use_tqdm=False)]
    for png, messages, got in zip(IMAGES, chats, together):
        hf_messages = [{"role": "user", "content": [{"type": "image"}, messages[0]["content"][1]]}]
        assert got == hf.generate(hf_messages, [png])
    llm.engine.flush_cache()
    assert llm.engine.used_slots == 0
    llm.close()

    bf16 = LLM(folder, device="cuda", data_type="bfloat16", max_total_token_num=4096, max_req_total_len=512,
               max_req_input_len=256, progress=False)
    pixels, grid = hf.pixels(IMAGES)
    ours = bf16.engine.runner.encode_images([pixels.reshape(int(grid.prod(-1).sum()), -1)],
                                            [tuple(g) for g in grid.tolist()])
    assert relative_error(torch.cat(ours).float().cpu(), hf.vision(IMAGES)) < 3e-2
    bf16.close()
