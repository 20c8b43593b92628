"""Mixture-of-experts GGUF files (qwen3moe, qwen2moe, and Mixtral as llama.cpp writes it: arch llama
with expert tensors) against Hugging Face transformers: prefill logits at every position and 16 greedy
decode steps through the token-slot pool, within 1e-4 relative (float32).

The files are written here from tiny random transformers models as llama.cpp's converter lays them
out: tensor names from the gguf package's own table, each projection of a layer's experts as one
stacked tensor (or, as the first Mixtral files, one per expert), Q/K rows of llama-arch files
interleaved. The reference for the qwen files is transformers' own GGUF loader (`gguf_file=`), which
dequantizes Q8_0 itself; it does not read llama-arch experts, so a Mixtral file is checked against
the model it was written from. GGUF has no dense block among sparse ones for these archs (llama.cpp
builds every block as experts), so no file here has one.
"""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.constants import MODEL_ARCH
from gguf.quants import quantize
from support.hf_match import assert_matches_hf
from support.moe_models import random_moe_model

from lightllm_plugin.models.gguf import gguf_model_config, gguf_tensor_count, iter_gguf_tensors
from lightllm_plugin.models.loader import load_model
from lightllm_plugin.models.model_config import ModelConfig

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

CASES = {
    # top-2 of 4 renormalized, q/k norm, head_dim != hidden/heads (attention.key_length); F32
    "qwen3moe_f32": ("qwen3moe", False, False, lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        head_dim=24)),
    # top-4 of 6 without renormalization, a shared expert behind its sigmoid gate, q/k/v bias; Q8_0
    "qwen2moe_shared_q8_0": ("qwen2moe", True, False, lambda: transformers.Qwen2MoeConfig(
        **COMMON, num_experts=6, num_experts_per_tok=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=False)),
    # top-2 of 4, renormalized; F32
    "mixtral_f32": ("llama", False, False, lambda: transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2)),
    # the same in the first Mixtral files' layout: one tensor per expert and projection
    "mixtral_per_expert_f32": ("llama", False, True, lambda: transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2)),
}
_ARCH = {"qwen3moe": MODEL_ARCH.QWEN3MOE, "qwen2moe": MODEL_ARCH.QWEN2MOE, "llama": MODEL_ARCH.LLAMA}


def _hf_model(config):
    return random_moe_model(config)


def _interleave_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter stores each head's rotate-half rows (a0 a1 | b0 b1) as (a0 b0 a1 b1)
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_byte_level_vocab(writer: GGUFWriter, vocab_size: int) -> int:
    """A GPT-2 style vocabulary of `vocab_size` tokens (the 256 bytes, some merged pairs, an end
    token) for the engine's tokenizer; returns the end token's id."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = [f"{a} {b}" for a in "aeiou" for b in "abcdefghijklmnopqrstuvwxyz"][: vocab_size - 257]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # normal tokens, then a control token
    writer.add_token_merges(merges)
    return len(tokens) - 1


def _write_gguf(path, hf_model, arch: str, q8_0: bool, per_expert: bool = False) -> None:
    cfg = hf_model.config
    writer = GGUFWriter(str(path), arch)
    end_token = _add_byte_level_vocab(writer, cfg.vocab_size)
    cfg.bos_token_id = cfg.eos_token_id = end_token  # the file's, as a converted checkpoint's
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "llama":
        writer.add_expert_count(cfg.num_local_experts)
    else:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        writer.add_eos_token_id(cfg.eos_token_id)
    if arch == "qwen3moe":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    names = get_tensor_name_map(_ARCH[arch], cfg.num_hidden_layers)
    for hf_name, tensor in hf_model.state_dict().items():
        arr = tensor.numpy()
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # transformers 5 holds gate rows then up rows
            stem, half = hf_name.removesuffix("gate_up_proj"), arr.shape[1] // 2
            pieces, suffix = [(stem + "gate_proj", arr[:, :half]), (stem + "up_proj", arr[:, half:])], ".weight"
        elif hf_name.endswith("mlp.experts.down_proj"):
            pieces, suffix = [(hf_name, arr)], ".weight"
        else:
            stem, _, kind = hf_name.rpartition(".")
            pieces, suffix = [(stem, arr)], "." + kind
        for stem, piece in pieces:
            gguf_name = names.get_name(stem)
            assert gguf_name is not None, hf_name
            if arch == "llama" and stem.endswith("self_attn.q_proj"):
                piece = _interleave_rope_rows(piece, cfg.num_attention_heads)
            elif arch == "llama" and stem.endswith("self_attn.k_proj"):
                piece = _interleave_rope_rows(piece, cfg.num_key_value_heads)
            if per_expert and gguf_name.endswith("_exps"):  # blk.N.ffn_gate.E, as llama.cpp once wrote
                for expert, rows in enumerate(piece):
                    writer.add_tensor(f"{gguf_name.removesuffix('_exps')}.{expert}{suffix}", np.ascontiguousarray(rows))
                continue
            if stem.endswith("shared_expert_gate"):
                piece = piece.reshape(-1)  # llama.cpp's is [n_embd]
            piece = np.ascontiguousarray(piece)
            if q8_0 and piece.ndim >= 2 and piece.shape[-1] % 32 == 0:
                writer.add_tensor(gguf_name + suffix, quantize(piece, GGMLQuantizationType.Q8_0),
                                  raw_dtype=GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(gguf_name + suffix, piece)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_prefill_and_decode_match_hf(case, tmp_path):
    arch, q8_0, per_expert, make_config = CASES[case]
    hf_model = _hf_model(make_config())
    path = tmp_path / f"{case}.gguf"
    _write_gguf(path, hf_model, arch, q8_0, per_expert)

    # the file's config is the one the model was built from
    hf_dict = dict(hf_model.config.to_dict(), architectures=[type(hf_model).__name__])
    expected_cfg = ModelConfig.from_hf_dict(hf_dict)
    model, cfg = load_model("gguf", str(path), torch.float32, torch.device("cpu"), 256, progress=False)
    assert cfg == ModelConfig.from_hf_dict(gguf_model_config(str(path)))
    assert gguf_tensor_count(str(path)) == sum(1 for _ in iter_gguf_tensors(str(path)))  # the progress bar's total
    assert cfg.rms_norm_eps == pytest.approx(expected_cfg.rms_norm_eps)  # a float32 in the file
    assert dataclasses.replace(cfg, rms_norm_eps=expected_cfg.rms_norm_eps) == expected_cfg

    if arch == "llama":
        reference = hf_model
    else:
        # transformers maps no expert width from GGUF metadata (its Qwen-MoE configs would take the
        # default 768/1408), so it gets the config; the tensors it reads and dequantizes itself
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, config=hf_model.config, dtype=torch.float32).eval()
        # the reference holds the file's weights: the model's own in F32, rounded ones in Q8_0
        written = hf_model.state_dict()
        for pname, p in reference.state_dict().items():
            if q8_0 and p.dim() >= 2 and p.shape[-1] % 32 == 0 and "shared_expert_gate" not in pname:  # as written
                assert not torch.equal(p, written[pname]) and torch.allclose(p, written[pname], atol=0.02), pname
            else:
                assert torch.equal(p, written[pname]), pname
    prompt = torch.randint(0, COMMON["vocab_size"], (37,), generator=torch.Generator().manual_seed(2))
    assert_matches_hf(model, cfg, reference, prompt)


def _hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(hf_model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


def test_offline_llm_serves_a_quantized_moe_gguf_file(tmp_path, monkeypatch):
    """The whole engine (scheduler, token-slot pool, its tokenizer from the file's vocabulary) on a
    Q8_0 Qwen2-MoE file: each prompt of one batch gets transformers' 16 greedy tokens, no slot leaks."""
    from lightllm_plugin import LLM, SamplingParams

    monkeypatch.setenv("LIGHTLLM_PLUGIN_CACHE", str(tmp_path / "cache"))  # the converted tokenizer's home
    arch, q8_0, _, make_config = CASES["qwen2moe_shared_q8_0"]
    hf_model = _hf_model(make_config())
    path = tmp_path / "tiny-qwen2moe-q8_0.gguf"
    _write_gguf(path, hf_model, arch, q8_0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, config=hf_model.config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 40)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(str(path), data_type="float32", max_total_token_num=512, max_req_total_len=128,
             max_req_input_len=64, progress=False) as llm:
        assert llm.tokenizer.eos_token_id == hf_model.config.eos_token_id
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.used_slots == llm.engine.cached_slots
    assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(reference, p, 16) for p in prompts]
