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
    "no image": ([{"role": "user", "content": "Describe a red square."}], []),  # in the batch of the others
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
    # the chats in one batch: their images go through one vision step together
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


def test_published_config_layouts_parse(tmp_path):
    """The layouts of released checkpoints: Qwen2-VL-7B-Instruct's flat config with M-RoPE as a
    rope_scaling type, and llava-1.5's, whose text_config leaves Llama's defaults out."""
    import json

    from lightllm_plugin.models.loader import read_hf_config
    from lightllm_plugin.models.model_config import ModelConfig
    from lightllm_plugin.models.vision_qwen2 import VisionConfig

    qwen = {"architectures": ["Qwen2VLForConditionalGeneration"], "hidden_size": 3584, "intermediate_size": 18944,
            "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "vocab_size": 152064,
            "image_token_id": 151655, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                              "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    cfg = ModelConfig.from_hf_dict(qwen)
    assert (cfg.mrope_section, cfg.rope_theta, cfg.rope_scaling, cfg.qkv_bias, cfg.o_bias, cfg.sliding_window) == (
        (16, 24, 24), 1000000.0, None, True, False, None)
    vision = VisionConfig.from_hf_dict(cfg.vision_config, "qwen2_vl", cfg.hidden_size)
    assert (vision.embed_dim, vision.mlp_hidden, vision.out_dim, vision.hidden_act) == (1280, 5120, 3584, "quick_gelu")
    llava = {"architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000, "model_type": "llava",
             "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
             "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
                             "vocab_size": 32064},
             "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                               "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                               "patch_size": 14, "projection_dim": 768}}
    (tmp_path / "config.json").write_text(json.dumps(llava))
    cfg = ModelConfig.from_hf_dict(read_hf_config(str(tmp_path)))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size, cfg.image_token_id) == (
        4096, 32, 32, 11008, 32064, 32000)
