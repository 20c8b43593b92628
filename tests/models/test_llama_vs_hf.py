"""Our Llama-family model against Hugging Face transformers on tiny random-weight models.

Prefill logits at every position and 16 greedy decode steps, read through the token-slot
KV pool, must match HF's own forward within 1e-4 relative (float32).
"""

import pytest
import torch
import transformers

from lightllm_plugin.engine.memory import allocate_kv_pool
from lightllm_plugin.models.kv_cache import AttentionMetadata
from lightllm_plugin.models.loader import load_model

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CONFIGS = {
    "llama_gqa": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0),
    "llama31_rope_scaling": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2_bias_tied": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3_qk_norm": lambda: transformers.Qwen3Config(**COMMON, head_dim=24),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
}


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_decode_match_hf(name, tmp_path):
    torch.manual_seed(0)
    hf_config = CONFIGS[name]()
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    # random init leaves biases and norms at 0/1; perturb them so those paths are really tested
    with torch.no_grad():
        for pname, p in hf_model.named_parameters():
            if "bias" in pname or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    hf_model.save_pretrained(tmp_path)

    model, cfg = load_model("hf", str(tmp_path), torch.float32, torch.device("cpu"), 256, progress=False)
    assert cfg.tie_word_embeddings == bool(hf_config.tie_word_embeddings)

    prompt = torch.randint(0, COMMON["vocab_size"], (37,))
    pool = allocate_kv_pool(cfg.num_layers, 128, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    req_to_token = torch.zeros(2, 128, dtype=torch.int32)
    # deliberately scattered slots: token attention must not assume contiguity
    slot_order = torch.randperm(128, generator=torch.Generator().manual_seed(1)).to(torch.int32)

    def ours(tokens: torch.Tensor, start: int, all_logits: bool) -> torch.Tensor:
        n = tokens.numel()
        slots = slot_order[start : start + n]
        req_to_token[1, start : start + n] = slots
        meta = AttentionMetadata(
            req_to_token=req_to_token,
            b_req_idx=torch.tensor([1]),
            b_seq_len=torch.tensor([start + n]),
            b_q_start=torch.tensor([0]),
            b_q_len=torch.tensor([n]),
            out_slots=slots.long(),
        )
        index = None if all_logits else torch.tensor([n - 1])
        return model(tokens, torch.arange(start, start + n), pool, meta, index)

    with torch.no_grad():
        ref = hf_model(prompt[None]).logits[0]
    got = ours(prompt, 0, all_logits=True)
    assert _relative_error(got, ref) < 1e-4

    sequence = prompt.tolist()
    for _ in range(16):
        next_token = int(ref[-1].argmax())
        sequence.append(next_token)
        with torch.no_grad():
            ref = hf_model(torch.tensor([sequence])).logits[0]
        got = ours(torch.tensor([next_token]), len(sequence) - 1, all_logits=False)
        assert _relative_error(got[0], ref[-1]) < 1e-4


@pytest.mark.parametrize("name", ["llama31_rope_scaling", "qwen3_qk_norm", "qwen2_bias_tied"])
def test_in_memory_checkpoint_equals_the_saved_one(name, tmp_path):
    """A transformers model's state_dict handed over in memory builds the same model as its
    safetensors folder, sharing the tensors it does not fuse instead of copying them."""
    from lightllm_plugin.models.loader import InMemoryCheckpoint, load_checkpoint

    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32).eval()
    hf_model.save_pretrained(tmp_path)
    saved, saved_cfg = load_model("hf", str(tmp_path), torch.float32, torch.device("cpu"), 256, progress=False)
    config = hf_model.config.to_dict()
    config["architectures"] = [type(hf_model).__name__]
    state = hf_model.state_dict()
    model, cfg = load_checkpoint(InMemoryCheckpoint(config, state.items()), torch.float32, torch.device("cpu"), 256,
                                 progress=False)
    assert cfg == saved_cfg
    ours = dict(model.named_parameters())
    for pname, p in saved.named_parameters():
        assert torch.equal(ours[pname], p), pname
    assert model.embed_tokens.weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()
