"""A request's images inside the engine: where their tokens sit in the prompt, their M-RoPE
positions, their embeddings once the vision step has run, and the prompt's prefix-cache key.

The key is the prompt with each image token replaced by a number derived from its image's content
hash and its index in the image (negative, so never a vocabulary id): two prompts share cached KV
over an image only when it is the same image, and a prompt's text after an image matches only
behind that image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lightllm_plugin.images import ImageData
from lightllm_plugin.models.qwen2_vl import MultimodalInputs

_INDEX_BITS = 24  # image tokens of one image: fewer than 2**24


@dataclass
class ImageSpan:
    hash: str
    start: int  # its first token's index in the prompt
    end: int
    grid: tuple[int, int, int]
    patch_dim: int
    pixels: bytes  # dropped once the embedding is there: a 1024x1024 image's patches are 26 MB
    embedding: torch.Tensor | None = None  # [num_tokens, hidden] once encoded

    @classmethod
    def of(cls, image: ImageData) -> "ImageSpan":
        return cls(image.hash, image.offset, image.offset + image.num_tokens, tuple(image.grid), image.patch_dim,
                   image.pixels)

    def set_embedding(self, embedding: torch.Tensor) -> None:
        self.embedding, self.pixels = embedding, b""


@dataclass
class MultimodalPrompt:
    positions: torch.Tensor  # [3, prompt_len] M-RoPE positions of the prompt
    delta: int  # a token after the prompt sits at its sequence index + delta
    spans: list[ImageSpan] = field(default_factory=list)

    def pixels(self, span: ImageSpan) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(span.pixels, dtype=np.float32).reshape(-1, span.patch_dim).copy())

    def unencoded(self, start: int, end: int) -> list[ImageSpan]:
        """The images with tokens in [start, end) whose embeddings are not there yet."""
        return [s for s in self.spans if s.embedding is None and s.start < end and s.end > start]


def check_images(prompt_ids: list[int], images: list[ImageData], image_token_id: int, tokens_of) -> None:
    """ValueError unless the images' spans lie in the prompt, in order, on placeholder tokens."""
    previous_end = 0
    for i, image in enumerate(images):
        if len(image.grid) != 3 or image.num_tokens != tokens_of(tuple(image.grid)):
            raise ValueError(f"images[{i}]: its grid {image.grid} does not give {image.num_tokens} tokens")
        if image.offset < previous_end or image.offset + image.num_tokens > len(prompt_ids):
            raise ValueError(f"images[{i}]: its tokens are not inside the prompt, after the image before it")
        if any(t != image_token_id for t in prompt_ids[image.offset : image.offset + image.num_tokens]):
            raise ValueError(f"images[{i}]: the prompt does not hold its placeholder tokens")
        t, h, w = image.grid
        if len(image.pixels) != t * h * w * image.patch_dim * 4:
            raise ValueError(f"images[{i}]: {len(image.pixels)} bytes of pixels for a grid of {image.grid}")
        previous_end = image.offset + image.num_tokens


def build_prompt(prompt_ids: list[int], images: list[ImageData], model) -> tuple[MultimodalPrompt, list[int]]:
    """The request's multimodal state and its prefix-cache key; `model` gives the positions
    (M-RoPE's, or the sequence index)."""
    positions, delta = model.prompt_positions(len(prompt_ids), [(im.offset, tuple(im.grid)) for im in images])
    key = list(prompt_ids)
    for image in images:
        base = int(image.hash[:13], 16) << _INDEX_BITS
        for j in range(image.num_tokens):
            key[image.offset + j] = -1 - (base | j)
    return MultimodalPrompt(positions, delta, [ImageSpan.of(im) for im in images]), key


def step_inputs(entries, device: torch.device) -> MultimodalInputs | None:
    """One step's M-RoPE positions and image embeddings, from its entries (runner.StepEntry);
    None when no entry has images (every position row is then the sequence index)."""
    if not any(e.mm is not None for e in entries):
        return None
    rows, rope, embeds, packed = [], [], [], 0
    for e in entries:
        start, n = e.start_pos, len(e.input_ids)
        mm = e.mm
        if mm is None:
            rope.append(torch.arange(start, start + n).expand(3, -1))
        else:
            prompt_len = mm.positions.shape[1]
            if start < prompt_len:
                rope.append(mm.positions[:, start : min(start + n, prompt_len)])
            if start + n > prompt_len:
                rope.append(torch.arange(max(start, prompt_len), start + n).expand(3, -1) + mm.delta)
            for span in mm.spans:
                lo, hi = max(start, span.start), min(start + n, span.end)
                if lo < hi:
                    rows.append(torch.arange(lo - start, hi - start) + packed)
                    embeds.append(span.embedding[lo - span.start : hi - span.start])
        packed += n
    rope_positions = torch.cat(rope, dim=1).to(device)
    if not rows:
        return MultimodalInputs(rope_positions)
    return MultimodalInputs(rope_positions, torch.cat(rows).to(device), torch.cat(embeds))
