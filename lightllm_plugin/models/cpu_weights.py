"""How the CPU engine serves a model below float32: quantized projections for decode steps.

A CPU decode step reads every weight once, so its speed is set by the bytes per weight. A
projection gets a quantized copy for steps of up to GEMV_MAX_ROWS rows, computed by torch's CPU
weight-only kernels (those torchao's int4 / int8 weight-only layouts call), which take bfloat16
rows and bfloat16 scales:
- a weight the checkpoint already stores in 4 bits (GGUF Q4_1: groups of 32 weights sharing a
  scale and a minimum, the 16 levels spanning the group) is recognised by its values and kept as
  those very 4-bit codes, for `_weight_int4pack_mm_for_cpu`;
- with `int8=True`, any other weight gets int8 codes with one scale per output channel (symmetric,
  the scale rounded to bfloat16 before the weights are divided by it), for `_weight_int8pack_mm`.
  That is a new, lossy quantization, so only an explicit bfloat16/float16 asks for it.
Both kernels are a matrix-vector product per row, so bigger steps (prefill) run a float32 GEMM on
the float32 weight, which is kept: a prompt's K/V and its first token are those of float32.

The lm_head is the largest single weight, and greedy choices hang on its logits: an int8 head
alone changed them (3 of the 8 test chats kept float32's first 32 tokens, against 7 with a float32
head). So int8 logits only pick candidates: int8 weights times the rows quantized to int8 on the
fly, an integer GEMM (`torch._int_mm`, VNNI on x86: 2x the int8 weight-only kernel at one row, 2.6x
at eight); the best RESCORED candidates are recomputed from the float32 rows, so the argmax, like
the top of any distribution sampled from, is float32's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# from this many rows a float32 GEMM is as fast as the per-row kernels (AVX-512, 2 cores, the
# default model: the int4 kernel adds ~1.35 ms per row to a step of its 30 layers)
GEMV_MAX_ROWS = 16
KERNEL_DTYPE = torch.bfloat16  # the kernels' rows, scales and results
_GROUP = 32  # GGUF's block: weights per 4-bit scale and minimum
_INT4_N_TILE = 16  # the int4 kernel's layout takes output channels in tiles of 16
# the int8 head's logits are within ~0.4 of float32's on the default model while its 1st and 64th
# logits lie more than 1.6 apart, so float32's argmax is always among the int8 head's best 64
RESCORED = 64


def _int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes 0..15 [N, K], scales and minimums [N, K/32]) with w == codes * scale + minimum up to
    float32 rounding, or None when w is not such a 4-bit weight."""
    n, k = w.shape
    if k % _GROUP or n % _INT4_N_TILE:
        return None
    groups = w.reshape(n, k // _GROUP, _GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    codes = torch.round((groups - low[..., None]) / scale.clamp(min=torch.finfo(w.dtype).tiny)[..., None])
    error = (codes * scale[..., None] + low[..., None] - groups).abs().amax(-1)
    if bool((error > 1e-3 * scale + 1e-30).any()):
        return None
    return codes.reshape(n, k), scale, low


def _int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [N, K] and one KERNEL_DTYPE scale per output channel [N]."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(KERNEL_DTYPE).tiny).to(KERNEL_DTYPE)
    return torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8), scale


class StepRows:
    """Which packed rows of the step about to run are decode tokens (a request's one new token).
    Only those take the quantized kernels; prompt tokens take the float32 weight. So a row's
    arithmetic depends on what the row is, never on what else shares its step: a prompt sent alone
    or packed with others, a stream decoding alone or beside a prefill, gets the same tokens. The
    runner updates it before each forward; until then every row counts as a decode row."""

    def __init__(self):
        self.decode: torch.Tensor | None = None  # row indices; None: every row

    def update(self, q_start: torch.Tensor, q_len: torch.Tensor) -> None:
        one = q_len == 1
        self.decode = None if bool(one.all()) else q_start[one]


class QuantizedProjection(nn.Module):
    """y = x W^T (+ b) for float32 x: the decode rows of a step (StepRows) through the int4 or int8
    kernel while there are a few, every other row through the float32 weight. Build it with
    `from_int4` or `from_int8`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, codes: torch.Tensor,
                 scales: torch.Tensor, step_rows: StepRows | None = None):
        super().__init__()
        self.step_rows = StepRows() if step_rows is None else step_rows
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kind = kind
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    @classmethod
    def from_int4(cls, weight, bias, four_bit, step_rows: StepRows | None = None) -> QuantizedProjection:
        codes, scale, low = four_bit
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # the kernel reads (code - 8) * scale + zero: the minimum moved to the middle level
        scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1)  # [K/32, N, 2]
        return cls(weight, bias, "int4", packed, scales_and_zeros.contiguous().to(KERNEL_DTYPE), step_rows)

    @classmethod
    def from_int8(cls, weight, bias, step_rows: StepRows | None = None) -> QuantizedProjection:
        return cls(weight, bias, "int8", *_int8_codes(weight), step_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decode = self.step_rows.decode
        if decode is None:  # a decode step
            return self._quantized(x) if x.shape[0] <= GEMV_MAX_ROWS else F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight, self.bias)
        if 0 < decode.numel() <= GEMV_MAX_ROWS:
            out[decode] = self._quantized(x[decode])
        return out

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.to(KERNEL_DTYPE).contiguous()
        if self.kind == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.codes, _GROUP, self.scales)
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scales)
        out = out.float()
        return out if self.bias is None else out + self.bias


class RescoredHead(nn.Module):
    """The lm_head for CPU decode: int8 logits for the whole vocabulary, float32 ones for the
    RESCORED best of them; many rows (a prefill asking for every token's logits) take float32."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # float32 [vocab, hidden], shared with a tied embedding
        w = weight.detach()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(w.dtype).tiny)
        self.register_buffer("codes", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > GEMV_MAX_ROWS:
            return F.linear(x, self.weight)
        x_scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(x.dtype).tiny)
        rows = torch.round(x / x_scale).to(torch.int8)
        logits = torch._int_mm(rows, self.codes.t()).float().mul_(x_scale).mul_(self.scales)
        best = logits.topk(min(RESCORED, logits.shape[1]), dim=1).indices  # [rows, RESCORED]
        # products summed row by row: bmm's sums depend on how many rows there are, and a row's
        # logits must not depend on what else shares its step
        exact = (self.weight[best] * x[:, None, :]).sum(-1)
        return logits.scatter_(1, best, exact)


def quantize_projections(model: nn.Module, kind: type, int8: bool, step_rows: StepRows | None = None) -> dict[str, int]:
    """Replace the modules of exactly type `kind` (a subclass, such as a projection that talks to
    other ranks, is left alone) that can be quantized by their QuantizedProjection, all reading
    `step_rows`, and a plain linear lm_head by a RescoredHead. Returns how many projections became
    int4 and int8."""
    counts = {"int4": 0, "int8": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not kind:
                continue
            weight = child.weight.detach().float()
            bias = None if child.bias is None else child.bias.detach().float()
            four_bit = _int4_codes(weight)
            if four_bit is not None:
                setattr(parent, name, QuantizedProjection.from_int4(weight, bias, four_bit, step_rows))
            elif int8:
                setattr(parent, name, QuantizedProjection.from_int8(weight, bias, step_rows))
            else:
                continue
            counts[getattr(parent, name).kind] += 1
    if type(getattr(model, "lm_head", None)) is nn.Linear:
        model.lm_head = RescoredHead(model.lm_head.weight)
    return counts
