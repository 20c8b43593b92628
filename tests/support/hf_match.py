"""Our model against a Hugging Face transformers model saved to a folder: prefill logits at every
position, then greedy decode steps, read through the token-slot KV pool (scattered slots)."""

import torch

from lightllm_plugin.engine.memory import allocate_kv_pool
from lightllm_plugin.models.kv_cache import AttentionMetadata


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def assert_matches_hf(model, cfg, hf_model, prompt: torch.Tensor, decode_steps: int = 16, tol: float = 1e-4,
                      pool_slots: int = 128) -> None:
    pool = allocate_kv_pool(cfg.num_layers, pool_slots, cfg.num_kv_heads, cfg.head_dim, torch.float32,
                            torch.device("cpu"))
    req_to_token = torch.zeros(2, pool_slots, dtype=torch.int32)
    # deliberately scattered slots: token attention must not assume contiguity
    slot_order = torch.randperm(pool_slots, generator=torch.Generator().manual_seed(1)).to(torch.int32)

    def ours(tokens: torch.Tensor, start: int, all_logits: bool) -> torch.Tensor:
        n = tokens.numel()
        slots = slot_order[start : start + n]
        req_to_token[1, start : start + n] = slots
        meta = AttentionMetadata(req_to_token=req_to_token, b_req_idx=torch.tensor([1]),
                                 b_seq_len=torch.tensor([start + n]), b_q_start=torch.tensor([0]),
                                 b_q_len=torch.tensor([n]), out_slots=slots.long())
        index = None if all_logits else torch.tensor([n - 1])
        return model(tokens, torch.arange(start, start + n), pool, meta, index)

    with torch.no_grad():
        ref = hf_model(prompt[None]).logits[0]
    got = ours(prompt, 0, all_logits=True)
    assert relative_error(got, ref) < tol, "prefill"
    sequence = prompt.tolist()
    for step in range(decode_steps):
        next_token = int(ref[-1].argmax())
        sequence.append(next_token)
        with torch.no_grad():
            ref = hf_model(torch.tensor([sequence])).logits[0]
        got = ours(torch.tensor([next_token]), len(sequence) - 1, all_logits=False)
        assert relative_error(got[0], ref[-1]) < tol, f"decode step {step}"
