"""The vision tower of Qwen2-VL and Qwen2.5-VL: patches of the preprocessed image in, one embedding
per 2x2 group of patches out (the language model's image tokens).

The image processor (the model folder's own) has already cut each image into patches of
temporal_patch_size x patch_size x patch_size pixels, ordered so that the patches of one 2x2
merge group are consecutive. Attention is within one image (Qwen2-VL), or, in Qwen2.5-VL's
windowed layers, within one window of merge groups; both go through SDPA on segments padded to a
batch. Positions are 2D rotary (row, column of the patch). Parameter names are the checkpoints'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    variant: str  # "qwen2_vl" or "qwen2_5_vl"
    depth: int
    embed_dim: int  # width of the blocks
    num_heads: int
    mlp_hidden: int
    out_dim: int  # the language model's hidden size
    hidden_act: str
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    rope_theta: float
    window_size: int = 0  # Qwen2.5-VL: pixels per side of an attention window
    fullatt_block_indexes: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, vision: dict[str, Any], variant: str, text_hidden: int) -> "VisionConfig":
        rope = vision.get("rope_parameters") or {}
        common = dict(
            variant=variant, depth=vision["depth"], num_heads=vision["num_heads"],
            patch_size=vision.get("patch_size", 14), temporal_patch_size=vision.get("temporal_patch_size", 2),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)),  # older files: in_chans
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
        if variant == "qwen2_vl":
            embed = vision["embed_dim"]
            return cls(embed_dim=embed, mlp_hidden=int(embed * vision.get("mlp_ratio", 4)),
                       out_dim=vision.get("hidden_size", text_hidden), hidden_act=vision.get("hidden_act", "quick_gelu"),
                       **common)
        return cls(embed_dim=vision["hidden_size"], mlp_hidden=vision["intermediate_size"],
                   out_dim=vision.get("out_hidden_size", text_hidden), hidden_act=vision.get("hidden_act", "silu"),
                   window_size=vision.get("window_size", 112),
                   fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", ())), **common)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return (lambda x: F.gelu(x, approximate="tanh")) if name.endswith("tanh") else F.gelu
    raise ValueError(f"unsupported vision activation {name!r}")


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(cfg: VisionConfig, dim: int, dtype: torch.dtype) -> nn.Module:
    if cfg.variant == "qwen2_vl":
        return nn.LayerNorm(dim, eps=1e-6, dtype=dtype)
    return _RMSNorm(dim, dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Bidirectional attention within each segment [bounds[i], bounds[i+1]) of the packed tokens.
    q, k, v: [N, H, D]. Segments of one length run as one SDPA batch; the others are padded to
    the longest and their padded keys masked."""
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    n, heads, dim = q.shape
    if len(set(lengths)) == 1:
        count, length = len(lengths), lengths[0]
        qs, ks, vs = (t.reshape(count, length, heads, dim).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(n, heads, dim)
    longest = max(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device))
    offset = torch.arange(n, device=q.device) - torch.tensor(bounds[:-1], device=q.device)[segment]
    padded = [t.new_zeros(len(lengths), longest, heads, dim) for t in (q, k, v)]
    for dst, src in zip(padded, (q, k, v)):
        dst[segment, offset] = src
    valid = torch.arange(longest, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
    qs, ks, vs = (t.transpose(1, 2) for t in padded)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2)[segment, offset]


class _Attention(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True, dtype=dtype)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)
        # rotary in float32, as the checkpoints were trained
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        return self.proj(segment_attention(q, k, v, bounds).reshape(n, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.gated = cfg.variant != "qwen2_vl"
        self.act = _activation(cfg.hidden_act)
        if self.gated:
            self.gate_proj = nn.Linear(cfg.embed_dim, cfg.mlp_hidden, bias=True, dtype=dtype)
            self.up_proj = nn.Linear(cfg.embed_dim, cfg.mlp_hidden, bias=True, dtype=dtype)
            self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.embed_dim, bias=True, dtype=dtype)
        else:
            self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden, bias=True, dtype=dtype)
            self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.embed_dim, dtype)
        self.norm2 = _norm(cfg, cfg.embed_dim, dtype)
        self.attn = _Attention(cfg, dtype)
        self.mlp = _MLP(cfg, dtype)

    def forward(self, x, cos, sin, bounds):
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    """The checkpoint's Conv3d whose stride equals its kernel: one matmul over flattened patches."""

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Module()
        shape = (cfg.embed_dim, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return pixels.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()


class _Merger(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.group = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = _norm(cfg, cfg.embed_dim, dtype)
        self.mlp = nn.Sequential(nn.Linear(self.group, self.group, dtype=dtype), nn.GELU(),
                                 nn.Linear(self.group, cfg.out_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.group))


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) of every patch [N, 2], in the processor's order (merge groups consecutive)."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        grouped = [p.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).reshape(-1) for p in (rows, cols)]
        out.append(torch.stack(grouped, dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_order(grids: list[tuple[int, int, int]], merge: int, window_units: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: a permutation of the merge groups that makes each window's groups
    consecutive (windows of window_units x window_units groups, cut at the image's edges), and
    the windows' bounds in patches."""
    order, bounds, base = [], [0], 0
    unit = merge * merge
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        for frame in range(t):
            index = torch.arange(gh * gw).reshape(gh, gw) + base + frame * gh * gw
            for r in range(0, gh, window_units):
                for c in range(0, gw, window_units):
                    window = index[r : r + window_units, c : c + window_units].reshape(-1)
                    order.append(window)
                    bounds.append(bounds[-1] + window.numel() * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg, dtype)
        self.blocks = nn.ModuleList(_Block(cfg, dtype) for _ in range(cfg.depth))
        self.merger = _Merger(cfg, dtype)
        head_dim = cfg.embed_dim // cfg.num_heads
        quarter = head_dim // 2
        # a buffer on the meta device would stay there: computed at each call (it is tiny)
        self._inv_freq_shape = (quarter, cfg.rope_theta)

    def _inv_freq(self, device) -> torch.Tensor:
        quarter, theta = self._inv_freq_shape
        return 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter))

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels [N, patch_dim] of the images in `grids` (t, h, w patches each), packed in that
        order -> [N / merge^2, out_dim], the images' tokens packed in the same order."""
        cfg = self.cfg
        merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        device = self.patch_embed.proj.weight.device
        x = self.patch_embed(pixels.to(device))
        positions = patch_positions(grids, merge).to(device)
        freqs = positions[:, :, None].float() * self._inv_freq(device)  # [N, 2, D/4]
        freqs = freqs.reshape(freqs.shape[0], -1)  # rows' then columns' angles
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [N, 1, D]
        cos, sin = angles.cos(), angles.sin()
        image_bounds = [0]
        for t, h, w in grids:
            for _ in range(t):  # each frame attends within itself
                image_bounds.append(image_bounds[-1] + h * w)
        windowed = cfg.variant == "qwen2_5_vl"
        if windowed:
            groups, window_bounds = window_order(grids, merge, cfg.window_size // merge // cfg.patch_size)
            groups = groups.to(device)
            n = x.shape[0]
            x = x.reshape(n // unit, unit, -1)[groups].reshape(n, -1)
            cos = cos.reshape(n // unit, unit, 1, -1)[groups].reshape(n, 1, -1)
            sin = sin.reshape(n // unit, unit, 1, -1)[groups].reshape(n, 1, -1)
        for i, block in enumerate(self.blocks):
            full = not windowed or i in cfg.fullatt_block_indexes
            # a window never straddles two images, so the full layers' per-image segments are
            # the windows of each image taken together: the same bounds in either order
            x = block(x, cos, sin, image_bounds if full else window_bounds)
        out = self.merger(x)
        if windowed:
            out = out[torch.argsort(groups)]
        return out
