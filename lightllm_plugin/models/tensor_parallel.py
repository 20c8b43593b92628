"""Tensor parallelism: which part of the model each rank holds, the modules that join the
parts, and the process group they talk through.

The model code does not know about ranks. At load time a rank builds the model with its
share of heads and MLP columns (`shard_model_config`), slices every checkpoint tensor as it
streams past (`shard_tensors`), and swaps four kinds of module on the still-empty model
(`install_parallel_modules`):
- q/k/v and gate/up are column-parallel: each rank computes its heads and columns, no talk;
- o_proj and down_proj are row-parallel: partial sums, added up by an all-reduce;
- the embedding and lm_head are vocab-parallel: each rank holds a contiguous block of rows
  (padded so the blocks are equal), the embedding all-reduces, the head all-gathers;
- a mixture-of-experts block is split as the dense MLP is: every rank holds every expert's share
  of its columns (and the shared expert's), routes all tokens itself with the whole router, and
  one all-reduce adds the partial sums of the routed and shared experts.
KV heads are split with their query heads; with fewer KV heads than ranks each KV head is
replicated on the ranks that share its query heads. Splits need not be even (the default
model has 3 KV heads and runs on 2 ranks as 2 + 1).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lightllm_plugin.kernels.one_row_linear import one_row_linear
from lightllm_plugin.models.model_config import ModelConfig
from lightllm_plugin.models.moe import SparseMoE

# a rank waits this long in a collective before giving up; the ranks of a healthy server
# only wait on each other within one forward, and a dead peer is noticed by the launcher
GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class TPShard:
    """The part of the model one rank holds: [start, stop) ranges over global indices."""

    rank: int
    world: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_block: int  # rows every rank's embedding/lm_head block has (the last one padded)
    moe_intermediate: tuple[int, int] = (0, 0)  # each expert's columns
    shared_intermediate: tuple[int, int] = (0, 0)  # the shared expert's columns


def _even_split(n: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous [start, stop) of part `index` when n items go to `parts` parts as evenly as possible."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def plan_shard(cfg: ModelConfig, rank: int, world: int) -> TPShard:
    """Rank `rank`'s share of a model split `world` ways; ValueError when it cannot be split."""
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    group = heads // kv  # query heads per KV head
    if kv >= world:
        kv_start, kv_stop = _even_split(kv, world, rank)
        q_heads = (kv_start * group, kv_stop * group)
    else:
        if world % kv or group % (world // kv):
            raise ValueError(
                f"tp={world} cannot split {heads} query heads over {kv} KV heads: with fewer KV heads than "
                f"ranks, the ranks must be a multiple of the KV heads and divide each KV head's {group} query heads"
            )
        sharing = world // kv  # ranks that hold a copy of one KV head
        kv_start = rank // sharing
        kv_stop = kv_start + 1
        per_rank = group // sharing
        first = kv_start * group + (rank % sharing) * per_rank
        q_heads = (first, first + per_rank)
    if cfg.intermediate_size < world:
        raise ValueError(f"tp={world} exceeds the model's MLP width {cfg.intermediate_size}")
    if cfg.num_experts and cfg.moe_intermediate_size < world:
        raise ValueError(f"tp={world} exceeds the experts' MLP width {cfg.moe_intermediate_size}")
    if cfg.shared_expert_intermediate_size and cfg.shared_expert_intermediate_size < world:
        raise ValueError(f"tp={world} exceeds the shared expert's MLP width {cfg.shared_expert_intermediate_size}")
    block = math.ceil(cfg.vocab_size / world)
    vocab = (min(rank * block, cfg.vocab_size), min((rank + 1) * block, cfg.vocab_size))
    return TPShard(rank, world, q_heads, (kv_start, kv_stop), _even_split(cfg.intermediate_size, world, rank),
                   vocab, block, _even_split(cfg.moe_intermediate_size, world, rank),
                   _even_split(cfg.shared_expert_intermediate_size, world, rank))


def shard_model_config(cfg: ModelConfig, shard: TPShard) -> ModelConfig:
    """The shape of one rank's model: its heads and MLP columns (the vocabulary stays global;
    the vocab-parallel modules hold their block)."""
    return dataclasses.replace(
        cfg,
        num_heads=shard.q_heads[1] - shard.q_heads[0],
        num_kv_heads=shard.kv_heads[1] - shard.kv_heads[0],
        intermediate_size=shard.intermediate[1] - shard.intermediate[0],
        moe_intermediate_size=shard.moe_intermediate[1] - shard.moe_intermediate[0],
        shared_expert_intermediate_size=shard.shared_intermediate[1] - shard.shared_intermediate[0],
    )


_LAYER_TENSOR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
# one expert's (or the shared expert's) projection; Mixtral names gate w1, up w3, down w2
_EXPERT_TENSOR = re.compile(
    r"^model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.(experts\.\d+|shared_expert)\.(\w+)\.weight$")
# transformers 5's stacked experts ([E, 2I, H] gate rows then up rows; [E, H, I])
_STACKED_EXPERTS = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")


def shard_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, shard: TPShard
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint stream with each tensor cut to this rank's part. Each cut is copied, so
    the full tensor is freed as soon as the next one is read."""
    d = cfg.head_dim
    q = slice(shard.q_heads[0] * d, shard.q_heads[1] * d)
    kv = slice(shard.kv_heads[0] * d, shard.kv_heads[1] * d)
    inter = slice(*shard.intermediate)
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": inter, "up_proj": inter}
    cols = {"o_proj": q, "down_proj": inter}
    moe = slice(*shard.moe_intermediate)
    shared = slice(*shard.shared_intermediate)
    for name, tensor in tensors:
        expert = _EXPERT_TENSOR.match(name)
        if expert is not None:
            part = shared if expert.group(1) == "shared_expert" else moe
            if expert.group(2) in ("gate_proj", "up_proj", "w1", "w3"):
                yield name, tensor[part].clone()
            else:
                yield name, tensor[:, part].contiguous()
            continue
        stacked = _STACKED_EXPERTS.match(name)
        if stacked is not None:
            if stacked.group(1) == "gate_up_proj":
                half = tensor.shape[1] // 2
                yield name, torch.cat([tensor[:, moe], tensor[:, half + moe.start : half + moe.stop]], dim=1)
            else:
                yield name, tensor[..., moe].contiguous()
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            block = tensor.new_zeros((shard.vocab_block, tensor.shape[1]))
            block[: shard.vocab[1] - shard.vocab[0]] = tensor[slice(*shard.vocab)]
            yield name, block
            continue
        match = _LAYER_TENSOR.match(name)
        if match is None:  # norms: every rank needs them whole
            yield name, tensor
            continue
        proj, kind = match.group(2), match.group(3)
        if proj in rows:
            yield name, tensor[rows[proj]].clone()
        elif proj in cols and kind == "weight":
            yield name, tensor[:, cols[proj]].contiguous()
        else:  # o_proj's bias: added once, after the all-reduce
            yield name, tensor


# ---- the process group -----------------------------------------------------------------
class TPGroup:
    """This rank's membership of the tensor-parallel group: NCCL on GPUs, gloo on CPU,
    rendezvous at 127.0.0.1:`port` (LightLLM's --nccl_port)."""

    def __init__(self, rank: int, world: int, port: int, device: torch.device):
        self.rank, self.world = rank, world
        if device.type == "cuda":
            visible = torch.cuda.device_count()
            if visible < world:
                raise ValueError(f"tp={world} puts one rank on each GPU, but {visible} GPU(s) are visible")
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
            torch.cuda.set_device(rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=GROUP_TIMEOUT
        )
        self.backend = backend

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device="cuda" if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- the modules that join the parts ------------------------------------------------------
class RowParallelProjection(nn.Linear):
    """A projection whose input features are split over the ranks: each computes a partial
    sum, the all-reduce adds them, and the bias (held whole by every rank) is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group: TPGroup):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(one_row_linear(x, self.weight, None))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + block) of the embedding; ids outside the block give zeros, and the
    all-reduce fills in every rank's rows."""

    def __init__(self, shard: TPShard, hidden: int, dtype: torch.dtype, group: TPGroup):
        super().__init__()
        self.start, self.block = shard.vocab[0], shard.vocab_block
        self.weight = nn.Parameter(torch.empty(self.block, hidden, dtype=dtype), requires_grad=False)
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.block)
        out = nn.functional.embedding(local.clamp(0, self.block - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.group.all_reduce(out)


class VocabParallelHead(nn.Module):
    """lm_head rows [start, start + block): each rank scores its block, the all-gather lays the
    blocks side by side, and the padding past the vocabulary is cut off."""

    def __init__(self, shard: TPShard, hidden: int, vocab_size: int, dtype: torch.dtype, group: TPGroup):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(shard.vocab_block, hidden, dtype=dtype), requires_grad=False)
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = nn.functional.linear(hidden, self.weight)
        return self.group.all_gather_last_dim(local)[..., : self.vocab_size]


class ParallelSparseMoE(SparseMoE):
    """The experts' columns this rank holds: the partial sums of the routed and the shared experts,
    added over the ranks by one all-reduce."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, group: TPGroup):
        super().__init__(cfg, dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))


def install_parallel_modules(model: nn.Module, full_cfg: ModelConfig, shard: TPShard, group: TPGroup,
                             dtype: torch.dtype) -> None:
    """Swap the modules that must talk to the other ranks, on the model still on `meta`
    (before its weights are loaded)."""
    with torch.device("meta"):
        for layer in model.layers:
            if getattr(layer, "moe", None) is not None:
                layer.moe = ParallelSparseMoE(layer.cfg, dtype, group)
            for name in ("o_proj", "down_proj"):
                old = getattr(layer, name, None)
                if old is None:  # a sparse layer: its experts replace the dense MLP
                    continue
                setattr(layer, name, RowParallelProjection(old.in_features, old.out_features, old.bias is not None,
                                                           dtype, group))
        model.embed_tokens = VocabParallelEmbedding(shard, full_cfg.hidden_size, dtype, group)
        model.lm_head = VocabParallelHead(shard, full_cfg.hidden_size, full_cfg.vocab_size, dtype, group)
