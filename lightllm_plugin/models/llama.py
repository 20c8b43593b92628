"""One implementation of the Llama family (Llama 2/3/3.1, Mistral, SmolLM, Qwen2/2.5, Qwen3, and
the mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE).

Differences between the members are flags in ModelConfig (qkv/o bias, q/k norm,
tied embeddings, rope scaling, which layers' MLP is experts: models/moe.py), not
subclasses. Attention reads and writes K/V through the token-slot pool; the model
never keeps a cache of its own.
Projections are fused (qkv, gate_up) so each layer runs four matmuls.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from lightllm_plugin.kernels.one_row_linear import one_row_linear
from lightllm_plugin.kernels.qk_rope_store import qk_rope_store, qk_rope_store_separate
from lightllm_plugin.kernels.rmsnorm import rmsnorm
from lightllm_plugin.kernels.silu_and_mul import silu_and_mul
from lightllm_plugin.kernels.token_attention import token_attention
from lightllm_plugin.models.kv_cache import AttentionMetadata, QuantizedKVCache
from lightllm_plugin.models.model_config import ModelConfig
from lightllm_plugin.models.moe import SparseMoE


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_freq_factors is not None:
        return (inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float64)).float()
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq.float()
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).float()
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled).float()


class Projection(nn.Linear):
    """A linear layer computed by one_row_linear: at batch-1 decode cuBLAS reads some weight
    shapes below the copy rate. A module rather than a bare weight, so a loader can swap in
    another kind (tensor parallelism's row-parallel projection) without touching this file."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_row_linear(x, self.weight, self.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, index: int = 0):
        super().__init__()
        self.cfg = cfg
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Projection(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Projection(q_size, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype)
        self.moe = SparseMoE(cfg, dtype) if index in cfg.sparse_layers else None
        if self.moe is None:
            self.gate_up_proj = Projection(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype)
            self.down_proj = Projection(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype)
        self.input_layernorm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.empty(cfg.head_dim, dtype=dtype), requires_grad=False)
            self.k_norm = nn.Parameter(torch.empty(cfg.head_dim, dtype=dtype), requires_grad=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor | QuantizedKVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        x, residual = rmsnorm(hidden, self.input_layernorm, eps, residual)
        qkv = self.qkv_proj(x)
        q_size = cfg.num_heads * cfg.head_dim
        # an int8 pool: quantized by kv_scatter as written, dequantized inside attention as read
        kv_scale = None
        if isinstance(kv_layer, QuantizedKVCache):
            kv_layer, kv_scale = kv_layer.values, kv_layer.scales
        # q/k norm, rotary and the K/V write: one launch on GPUs instead of up to four (an int8
        # pool takes the separate ops: its K/V are quantized as written)
        fused = qk_rope_store if kv_scale is None else partial(qk_rope_store_separate, kv_scale=kv_scale)
        q = fused(qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.q_norm if cfg.qk_norm else None,
                  self.k_norm if cfg.qk_norm else None, eps, cos, sin, kv_layer, meta.out_slots)
        attn = token_attention(
            q, kv_layer, meta.req_to_token, meta.b_req_idx, meta.b_seq_len, meta.b_q_start, meta.b_q_len, self.scale,
            kv_scale,
        )
        hidden = self.o_proj(attn.reshape(-1, q_size))
        x, residual = rmsnorm(hidden, self.post_attention_layernorm, eps, residual)
        if self.moe is not None:
            return self.moe(x), residual
        hidden = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return hidden, residual


class LlamaFamilyModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        # given its (empty) weight, nn.Embedding skips its random init: on the meta device that
        # init is a reference op whose first call imports torch._dynamo (~2 s in every process
        # that builds a model, and the loader overwrites the weight anyway)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        self.cos_cache: torch.Tensor | None = None
        self.sin_cache: torch.Tensor | None = None

    def build_rope_cache(self, device: torch.device, max_positions: int) -> None:
        """Called after the weights are loaded (the model is built on `meta`)."""
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(self.cfg))  # [P, D/2]
        self.cos_cache = freqs.cos().to(device)
        self.sin_cache = freqs.sin().to(device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, D/2] of each token's position (M-RoPE models take [3, T] positions)."""
        return self.cos_cache[positions], self.sin_cache[positions]

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor | QuantizedKVCache,  # [layers, slots+1, 2*Hkv, D]
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,  # [T, hidden] in place of the tokens' (images)
    ) -> torch.Tensor:
        """The last hidden state after the final norm [T, hidden]: what the heads read."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rope(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache[i], meta)
        hidden, _ = rmsnorm(hidden, self.norm, self.cfg.rms_norm_eps, residual)
        return hidden

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor | QuantizedKVCache,  # [layers, slots+1, 2*Hkv, D]
        meta: AttentionMetadata,
        logits_index: torch.Tensor | None = None,  # [B] rows whose logits are wanted; None: all
    ) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, positions, kv_cache, meta)
        if logits_index is not None:
            hidden = hidden[logits_index]
        return self.lm_head(hidden).float()
