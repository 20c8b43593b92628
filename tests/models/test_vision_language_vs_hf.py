"""Qwen2-VL, Qwen2.5-VL and LLaVA against Hugging Face transformers on tiny random folders: the
vision tower's output (Qwen2.5-VL's with several attention windows per image), and greedy tokens
of the offline API's chat for one image, two images, and an image in the second turn."""

import pytest
import torch
from support.hf_match import relative_error
from support.vision_models import ALL_KINDS, HFVisionReference, build_folder, data_url, png_bytes

from lightllm_plugin import LLM, SamplingParams

SQUARE, WIDE = png_bytes(56, 56, seed=1), png_bytes(112, 84, seed=2)  # 4 and 12 image tokens


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


CHATS = {
    "one image": ([{"role": "user", "content": [image_part(SQUARE), {"type": "text", "text": "What is in this picture?"}]}],
                  [SQUARE]),
    "two images": ([{"role": "user", "content": [{"type": "text", "text": "Compare"}, image_part(SQUARE),
                                                 image_part(WIDE)]}], [SQUARE, WIDE]),
    "image in the second turn": ([{"role": "user", "content": "Describe the image."},
                                  {"role": "assistant", "content": "A red square"},
                                  {"role": "user", "content": [image_part(WIDE), {"type": "text", "text": "and this?"}]}],
                                 [WIDE]),
}


def hf_messages(messages):
    """The same chat as transformers' processors take it: {"type": "image"} where the image goes."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str)
             else [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]


@pytest.fixture(scope="module", params=ALL_KINDS)
def vl_model(request, tmp_path_factory):
    folder = build_folder(tmp_path_factory.mktemp(request.param), request.param)
    llm = LLM(folder, max_total_token_num=2048, max_req_total_len=512, max_req_input_len=256, progress=False)
    llm.folder = folder
    yield llm, HFVisionReference(folder)
    llm.close()


def test_vision_tower_matches_hf(vl_model):
    llm, hf = vl_model
    pixels, grid = hf.pixels([SQUARE, WIDE])
    # LLaVA's [B, C, H, W] images as rows of patch size, the layout lightllm_plugin/images.py sends
    ours = llm.engine.runner.encode_images([pixels.reshape(int(grid.prod(-1).sum()), -1)],
                                           [tuple(g) for g in grid.tolist()])
    ref = hf.vision([SQUARE, WIDE])
    assert relative_error(torch.cat(ours), ref) < 1e-4


def test_greedy_tokens_match_hf_generate(vl_model):
    llm, hf = vl_model
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    # the three chats in one batch: their images go through one vision step together
    outputs = llm.chat([messages for messages, _ in CHATS.values()], params, use_tqdm=False)
    for (name, (messages, images)), out in zip(CHATS.items(), outputs):
        assert out.outputs[0].token_ids == hf.generate(hf_messages(messages), images), name
    engine = llm.engine
    engine.flush_cache()
    assert engine.used_slots == 0


def test_image_embeddings_and_prefix_cache_keyed_by_image(vl_model):
    llm, _ = vl_model
    engine = llm.engine
    engine.flush_cache()
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    chat = lambda png: [{"role": "user", "content": [image_part(png), {"type": "text", "text": "Describe"}]}]  # noqa: E731
    encoded = engine.images_encoded
    fresh = png_bytes(56, 56, seed=3)  # not sent before: its embedding is not cached yet
    first = llm.chat(chat(fresh), params, use_tqdm=False)[0]
    again = llm.chat(chat(fresh), params, use_tqdm=False)[0]
    other = llm.chat(chat(png_bytes(56, 56, seed=4)), params, use_tqdm=False)[0]
    # the same image again: its whole prompt but the last token comes from the cache, and its
    # embedding too; another image of the same size shares only the text before it
    assert again.num_cached_tokens == len(first.prompt_token_ids) - 1
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    image_start = first.prompt_token_ids.index(engine.model_cfg.image_token_id)
    assert other.num_cached_tokens == image_start
    assert engine.images_encoded - encoded == 2
    engine.flush_cache()
    assert engine.used_slots == 0


def test_prompt_chunks_that_cut_through_images(vl_model):
    """Prefill chunks of 5 tokens: each image's tokens arrive over several steps (its embedding is
    computed once, at the first), as does the text between them."""
    llm, hf = vl_model
    chunked = LLM(llm.folder, max_total_token_num=2048, max_req_total_len=512, max_req_input_len=256,
                  progress=False, chunked_prefill_size=5)
    messages, images = CHATS["two images"]
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    got = chunked.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf.generate(hf_messages(messages), images)
    assert chunked.engine.images_encoded == 2
    chunked.close()
