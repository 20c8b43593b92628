"""The mixture-of-experts MLP block of Mixtral, Qwen2-MoE and Qwen3-MoE: everything else in those
models is the Llama family's (models/llama.py), which holds one of these in place of its dense MLP
on the layers ModelConfig.sparse_layers names.

The experts' weights are stacked, one tensor per projection ([E, 2I, H] gate rows then up rows,
[E, H, I] down), filled expert by expert as the checkpoint streams (models/loader.py), so the
fused kernel indexes an expert instead of walking a list of modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightllm_plugin.kernels.fused_moe import fused_moe, workspace_bytes
from lightllm_plugin.kernels.one_row_linear import one_row_linear
from lightllm_plugin.kernels.silu_and_mul import silu_and_mul
from lightllm_plugin.models.model_config import ModelConfig


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        experts, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.router = nn.Linear(hidden, experts, bias=False, dtype=dtype)
        self.w_gate_up = nn.Parameter(torch.empty(experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(experts, hidden, inter, dtype=dtype), requires_grad=False)
        shared = cfg.shared_expert_intermediate_size
        self.shared_gate_up = nn.Linear(hidden, 2 * shared, bias=False, dtype=dtype) if shared else None
        self.shared_down = nn.Linear(shared, hidden, bias=False, dtype=dtype) if shared else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False, dtype=dtype) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        logits = F.linear(x, self.router.weight)  # [T, E]
        out = fused_moe(x, logits, self.w_gate_up, self.w_down, self.top_k, self.renormalize)
        if self.shared_gate_up is not None:
            shared = one_row_linear(silu_and_mul(one_row_linear(x, self.shared_gate_up.weight)), self.shared_down.weight)
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * shared
        return out


def moe_workspace_bytes(cfg: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    """The fused kernel's scratch memory for a forward of `tokens` tokens (0 for a dense model):
    one layer's at a time, since each is freed before the next layer runs."""
    if not cfg.sparse_layers:
        return 0
    return workspace_bytes(tokens, cfg.num_experts_per_tok, cfg.num_experts, cfg.hidden_size,
                           cfg.moe_intermediate_size, dtype)
