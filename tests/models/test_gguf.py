"""GGUF config and tensors, checked against transformers' own GGUF loader."""


import numpy as np
import pytest
import torch

from lightllm_plugin.models.default_model import default_model_path
from lightllm_plugin.models.gguf import gguf_model_config, iter_gguf_tensors


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def hf_reference(hf_default_model):
    """(config, state_dict) that transformers builds from the same file."""
    return hf_default_model.config, hf_default_model.state_dict()


def test_config_matches_transformers(gguf_path, hf_reference):
    ref, _ = hf_reference
    cfg = gguf_model_config(gguf_path)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "attention_bias", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    ref_theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    assert cfg["rope_theta"] == pytest.approx(ref_theta)
    assert cfg["tie_word_embeddings"] is True  # SmolLM2 has no output.weight


def test_tensors_match_transformers(gguf_path, hf_reference):
    _, ref = hf_reference
    seen = set()
    for name, tensor in iter_gguf_tensors(gguf_path):
        assert name in ref, name
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref[name].shape, name
        # Exact: both sides run the same dequantizer, and a wrong q/k un-permute
        # would move rows rather than perturb values.
        assert torch.equal(tensor, ref[name].to(torch.float32)), name
        seen.add(name)
    missing = set(ref) - seen
    assert missing <= {"lm_head.weight"}, missing
    assert "model.layers.29.self_attn.q_proj.weight" in seen


def test_bf16_dtype(gguf_path):
    name, tensor = next(iter_gguf_tensors(gguf_path, dtype=torch.bfloat16))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def _write_gguf(path, arch, tensors, extra=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    for fn in extra or ():
        fn(w)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_synthetic_not_permuted(tmp_path):
    rng = np.random.default_rng(0)
    head_dim = 6  # != hidden/heads, so it must come from attention.key_length
    arrays = {
        "token_embd.weight": rng.standard_normal((32, 8), dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((2 * head_dim, 8), dtype=np.float32),
        "blk.0.attn_k.weight": rng.standard_normal((head_dim, 8), dtype=np.float32),
        "blk.0.attn_q.bias": rng.standard_normal((2 * head_dim,), dtype=np.float32),
        "blk.0.attn_q_norm.weight": rng.standard_normal((head_dim,), dtype=np.float32),
        "blk.0.ffn_down.weight": rng.standard_normal((8, 16), dtype=np.float32),
        "output.weight": rng.standard_normal((32, 8), dtype=np.float32),
    }
    path = tmp_path / "tiny-qwen3.gguf"
    _write_gguf(path, "qwen3", arrays,
                extra=[lambda w: w.add_key_length(head_dim), lambda w: w.add_value_length(head_dim)])

    cfg = gguf_model_config(str(path))
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["head_dim"] == head_dim
    assert cfg["vocab_size"] == 32
    assert cfg["tie_word_embeddings"] is False
    assert cfg["attention_bias"] is True
    assert cfg["rope_theta"] == 1e6

    got = dict(iter_gguf_tensors(str(path)))
    expected_names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "output.weight": "lm_head.weight",
    }
    assert set(got) == set(expected_names.values())
    for gname, hname in expected_names.items():
        assert torch.equal(got[hname], torch.from_numpy(arrays[gname])), hname


def test_llama_synthetic_unpermutes_q_and_k(tmp_path):
    # Rows [r0, r1, r2, r3 | ...] of each head, as llama.cpp's converter stores them
    # interleaved: head h's HF rows (a0 a1 b0 b1) are written as (a0 b0 a1 b1).
    hf_q = np.arange(2 * 4 * 8, dtype=np.float32).reshape(8, 8)  # 2 heads, head_dim 4
    stored_q = hf_q.reshape(2, 2, 2, 8).swapaxes(1, 2).reshape(8, 8)
    hf_k = np.arange(4 * 8, dtype=np.float32).reshape(4, 8) + 1000  # 1 kv head
    stored_k = hf_k.reshape(1, 2, 2, 8).swapaxes(1, 2).reshape(4, 8)
    path = tmp_path / "tiny-llama.gguf"
    _write_gguf(path, "llama", {"blk.0.attn_q.weight": stored_q,
                                "blk.0.attn_k.weight": stored_k,
                                "token_embd.weight": np.zeros((32, 8), np.float32)})
    got = dict(iter_gguf_tensors(str(path)))
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(hf_q))
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(hf_k))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "tiny-gpt2.gguf"
    _write_gguf(path, "gpt2", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match="gpt2"):
        gguf_model_config(str(path))
    with pytest.raises(ValueError, match="gpt2"):
        next(iter_gguf_tensors(str(path)))


def test_llama3_rope_freqs_give_the_llama3_frequencies(tmp_path):
    """A GGUF llama3 file stores rope divisors; applied, they equal HF's llama3 rope scaling."""
    import dataclasses

    from lightllm_plugin.models.llama import rope_inv_freq
    from lightllm_plugin.models.model_config import ModelConfig

    base = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    })
    unscaled = rope_inv_freq(dataclasses.replace(base, rope_scaling=None))
    llama3 = rope_inv_freq(base)
    divisors = (unscaled.double() / llama3.double()).float().numpy()
    assert divisors.max() > 7.9 and divisors.min() == 1.0  # the scaling really bites

    path = tmp_path / "tiny-llama3.gguf"
    _write_gguf(path, "llama", {"token_embd.weight": np.zeros((32, 8), np.float32), "rope_freqs.weight": divisors})
    cfg = gguf_model_config(str(path))
    assert cfg["rope_freq_factors"] == pytest.approx(divisors.tolist())
    from_file = dataclasses.replace(base, rope_scaling=None, rope_freq_factors=cfg["rope_freq_factors"])
    assert torch.allclose(rope_inv_freq(from_file), llama3, rtol=1e-6)
