"""LLaVA (LlavaForConditionalGeneration): a CLIP vision tower, a two-layer projector and a
Llama-family language model. The tower sees a whole fixed-size image (the folder's CLIP image
processor resizes and crops it); the hidden state of layer `vision_feature_layer` (without the
class token under the "default" strategy) goes through the projector, one embedding per patch.
Positions are the sequence index, as in the language model alone. Parameter names are the
checkpoints'."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightllm_plugin.models.llama import LlamaFamilyModel
from lightllm_plugin.models.model_config import ModelConfig
from lightllm_plugin.models.vision_qwen2 import _activation


class _CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dtype: torch.dtype):
        super().__init__()
        self.heads = heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.Linear(dim, dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D]
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, dtype: torch.dtype):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, dtype=dtype)
        self.act = _activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _CLIPLayer(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps, dtype=dtype)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps, dtype=dtype)
        self.self_attn = _CLIPAttention(dim, cfg["num_attention_heads"], dtype)
        self.mlp = _CLIPMLP(dim, cfg["intermediate_size"], cfg.get("hidden_act", "quick_gelu"), dtype)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype):
        super().__init__()
        dim, patch, size = cfg["hidden_size"], cfg["patch_size"], cfg["image_size"]
        channels = cfg.get("num_channels", 3)
        self.patch = patch
        self.class_embedding = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.patch_embedding = nn.Module()
        self.patch_embedding.weight = nn.Parameter(torch.empty(dim, channels, patch, patch, dtype=dtype),
                                                   requires_grad=False)
        self.position_embedding = nn.Embedding((size // patch) ** 2 + 1, dim, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        weight = self.patch_embedding.weight
        patches = F.conv2d(pixels.to(weight.dtype), weight, stride=self.patch).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTower(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        self.embeddings = _CLIPEmbeddings(cfg, dtype)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps, dtype=dtype)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_CLIPLayer(cfg, dtype) for _ in range(cfg["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(dim, eps=eps, dtype=dtype)  # in checkpoints; LLaVA does not read it

    def hidden_state(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """The hidden state after `layer` layers (HF's hidden_states[layer]: 0 is the embeddings,
        -1 the last layer's output), [B, 1 + patches, D]."""
        layers = len(self.encoder.layers)
        stop = layer if layer >= 0 else layers + 1 + layer
        x = self.pre_layrnorm(self.embeddings(pixels))
        for block in self.encoder.layers[:stop]:
            x = block(x)
        return x


class LlavaModel(LlamaFamilyModel):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__(cfg, dtype)
        vision = cfg.vision_config
        self.vision_tower = CLIPVisionTower(vision, dtype)
        self.feature_layer = int(vision.get("vision_feature_layer", -2))
        self.keep_class_token = vision.get("vision_feature_select_strategy", "default") == "full"
        bias = vision.get("multimodal_projector_bias", True)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(vision["hidden_size"], cfg.hidden_size, bias=bias, dtype=dtype)
        self.multi_modal_projector.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias, dtype=dtype)
        self._projector_act = _activation(vision.get("projector_hidden_act", "gelu"))
        self._patch, self._channels = vision["patch_size"], vision.get("num_channels", 3)

    def image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w + (1 if self.keep_class_token else 0)

    def prompt_positions(self, prompt_len: int, images) -> tuple[torch.Tensor, int]:
        return torch.arange(prompt_len).expand(3, -1), 0

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Images of one size each [C*H*W] a row, packed -> [tokens, hidden] per image."""
        p, c = self._patch, self._channels
        out: list[torch.Tensor] = []
        offset = 0
        for t, h, w in grids:  # images of one size could share a batch; LLaVA's all have the crop size
            size = c * h * p * w * p
            image = pixels.reshape(-1)[offset : offset + size].reshape(1, c, h * p, w * p)
            offset += size
            features = self.vision_tower.hidden_state(image, self.feature_layer)
            if not self.keep_class_token:
                features = features[:, 1:]
            proj = self.multi_modal_projector
            out.append(proj.linear_2(self._projector_act(proj.linear_1(features)))[0].to(self.embed_tokens.weight.dtype))
        return out

    @torch.inference_mode()
    def hidden_states(self, input_ids, positions, kv_cache, meta, mm=None) -> torch.Tensor:
        if mm is None or mm.image_rows is None:
            return super().hidden_states(input_ids, positions, kv_cache, meta)
        return super().hidden_states(input_ids, positions, kv_cache, meta,
                                     inputs_embeds=self._with_images(input_ids, mm))

    def _with_images(self, input_ids, mm) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden[mm.image_rows] = mm.image_embeds.to(hidden.dtype)
        return hidden

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_cache, meta, logits_index=None, mm=None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, positions, kv_cache, meta, mm)
        if logits_index is not None:
            hidden = hidden[logits_index]
        return self.lm_head(hidden).float()
