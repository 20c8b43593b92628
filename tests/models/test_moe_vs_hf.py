"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against Hugging Face transformers on
tiny random-weight folders saved as HF saves them (one tensor per expert): prefill logits at every
position and 16 greedy decode steps through the token-slot pool, within 1e-4 relative (float32)."""

import pytest
import torch
import transformers
from support.hf_match import assert_matches_hf
from support.moe_models import random_moe_model

from lightllm_plugin.models.loader import InMemoryCheckpoint, load_checkpoint, load_model

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    # top-2 of 8, renormalized
    "mixtral_top2": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
    # top-4 of 6 without renormalization, a shared expert behind its sigmoid gate, layer 1 dense
    "qwen2moe_top4_shared_dense_layer": lambda: transformers.Qwen2MoeConfig(
        **COMMON, num_experts=6, num_experts_per_tok=4, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1]),
    # top-1 of 4, q/k norm
    "qwen3moe_top1": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=40, norm_topk_prob=True, head_dim=24),
    # every second layer sparse (layers 1 and 3 of 4 ... here layer 1 of 3), top-2 renormalized
    "qwen3moe_sparse_step2": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True,
        decoder_sparse_step=2),
}


def _hf_model(name):
    return random_moe_model(CONFIGS[name]())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_decode_match_hf(name, tmp_path):
    hf_model = _hf_model(name)
    hf_model.save_pretrained(tmp_path)
    model, cfg = load_model("hf", str(tmp_path), torch.float32, torch.device("cpu"), 256, progress=False)
    assert cfg.architecture == type(hf_model).__name__
    hf_cfg = hf_model.config
    dense = [i for i, layer in enumerate(hf_model.model.layers) if not hasattr(layer.mlp, "experts")]
    assert [i for i in range(cfg.num_layers) if i not in cfg.sparse_layers] == dense
    prompt = torch.randint(0, COMMON["vocab_size"], (37,), generator=torch.Generator().manual_seed(2))
    assert_matches_hf(model, cfg, hf_model, prompt)
    assert cfg.num_experts_per_tok == hf_cfg.num_experts_per_tok


def test_in_memory_state_dict_with_stacked_experts_equals_the_saved_folder(tmp_path):
    """transformers 5 holds experts stacked ([E, 2I, H]); its state_dict handed over in memory builds
    the same model as the folder it saves (one tensor per expert)."""
    name = "qwen2moe_top4_shared_dense_layer"
    hf_model = _hf_model(name)
    hf_model.save_pretrained(tmp_path)
    saved, saved_cfg = load_model("hf", str(tmp_path), torch.float32, torch.device("cpu"), 256, progress=False)
    config = hf_model.config.to_dict()
    config["architectures"] = [type(hf_model).__name__]
    model, cfg = load_checkpoint(InMemoryCheckpoint(config, hf_model.state_dict().items()), torch.float32,
                                 torch.device("cpu"), 256, progress=False)
    assert cfg == saved_cfg
    ours = dict(model.named_parameters())
    assert set(ours) == {n for n, _ in saved.named_parameters()}
    for pname, p in saved.named_parameters():
        assert torch.equal(ours[pname], p), pname
