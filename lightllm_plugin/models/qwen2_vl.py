"""Qwen2-VL and Qwen2.5-VL: the vision tower (models/vision_qwen2.py) and a Qwen2 language model
whose rotary positions are M-RoPE: (time, row, column) for an image's tokens, the text's index
for text, each of the three given its own band of rotary frequencies (mrope_section).

The language model is the dense family's (LlamaFamilyModel) with two inputs more per step
(MultimodalInputs): the image embeddings that replace the placeholder tokens' embeddings, and
the three position rows. Where all three rows are equal (text, and every decode step) M-RoPE is
ordinary RoPE at that position, so a step with no image tokens may leave them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightllm_plugin.models.kv_cache import AttentionMetadata, QuantizedKVCache
from lightllm_plugin.models.llama import LlamaFamilyModel
from lightllm_plugin.models.model_config import ModelConfig
from lightllm_plugin.models.vision_qwen2 import VisionConfig, VisionTower


@dataclass
class MultimodalInputs:
    """One step's extra inputs on a vision-language model."""

    rope_positions: torch.Tensor  # [3, T] (time, row, column) of each packed token
    image_rows: torch.Tensor | None = None  # [K] packed tokens that are image tokens
    image_embeds: torch.Tensor | None = None  # [K, hidden] their embeddings, from the vision tower


def mrope_positions(prompt_len: int, images: list[tuple[int, tuple[int, int, int]]], merge: int
                    ) -> tuple[torch.Tensor, int]:
    """M-RoPE positions of a prompt [3, prompt_len] and the shift of the tokens after it
    (position = sequence index + delta). `images`: (offset of its first token, its (t, h, w)
    patch grid), in prompt order. Text advances all three rows by one a token; an image's tokens
    sit at (t, row, column) from where the text stopped, and the text after it resumes past the
    image's larger side (Hugging Face's get_rope_index)."""
    parts, index, current = [], 0, 0
    for offset, (t, h, w) in images:
        if offset > index:
            parts.append(torch.arange(offset - index).expand(3, -1) + current)
            current += offset - index
        gh, gw = h // merge, w // merge
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
        parts.append(grid.reshape(3, -1) + current)
        current += max(gh, gw)
        index = offset + t * gh * gw
    if prompt_len > index:
        parts.append(torch.arange(prompt_len - index).expand(3, -1) + current)
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions, int(positions.max()) + 1 - prompt_len


class Qwen2VLModel(LlamaFamilyModel):
    # a token after an image sits at its sequence index + the request's delta (not the index)
    shifted_positions = True

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__(cfg, dtype)
        variant = "qwen2_5_vl" if cfg.architecture.startswith("Qwen2_5") else "qwen2_vl"
        self.vision_cfg = VisionConfig.from_hf_dict(cfg.vision_config, variant, cfg.hidden_size)
        self.visual = VisionTower(self.vision_cfg, dtype)
        section = list(cfg.mrope_section)
        if sum(section) != cfg.head_dim // 2:
            raise ValueError(f"mrope_section {section} must add up to head_dim/2 = {cfg.head_dim // 2}")
        self._section_bounds = [0, section[0], section[0] + section[1], sum(section)]

    @property
    def spatial_merge_size(self) -> int:
        return self.vision_cfg.spatial_merge_size

    def prompt_positions(self, prompt_len: int, images: list[tuple[int, tuple[int, int, int]]]):
        return mrope_positions(prompt_len, images, self.spatial_merge_size)

    def image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.spatial_merge_size**2

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """The vision tower over several images at once: one [tokens, hidden] per image."""
        out = self.visual(pixels, grids).to(self.embed_tokens.weight.dtype)
        return list(out.split([self.image_tokens(g) for g in grids]))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().rope(positions)
        b = self._section_bounds
        cos = torch.cat([self.cos_cache[positions[i], b[i] : b[i + 1]] for i in range(3)], dim=1)
        sin = torch.cat([self.sin_cache[positions[i], b[i] : b[i + 1]] for i in range(3)], dim=1)
        return cos, sin

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor | QuantizedKVCache,
        meta: AttentionMetadata,
        mm: MultimodalInputs | None = None,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if mm is not None and mm.image_rows is not None:
            hidden[mm.image_rows] = mm.image_embeds.to(hidden.dtype)
        return super().hidden_states(input_ids, mm.rope_positions if mm is not None else positions, kv_cache, meta,
                                     inputs_embeds=hidden)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor | QuantizedKVCache,
        meta: AttentionMetadata,
        logits_index: torch.Tensor | None = None,
        mm: MultimodalInputs | None = None,
    ) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, positions, kv_cache, meta, mm)
        if logits_index is not None:
            hidden = hidden[logits_index]
        return self.lm_head(hidden).float()
