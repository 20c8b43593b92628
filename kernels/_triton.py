"""Whether a launcher takes its Triton kernel or its plain-torch reference.

Triton is optional: CPU-only installs (CI) may lack it, and then every op runs its
reference. On CUDA tensors the Triton kernels run. On CPU they run only when
`TRITON_INTERPRET=1` was set before this package was imported (the `@triton.jit`
decorator picks the interpreter at decoration time) and `RUN_ON_CPU` is switched on:
the interpreter is far too slow for the engine, so only the kernel tests ask for it.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is not installed
    triton = None
    tl = None
    HAVE_TRITON = False

# read once: decorators were already resolved against this value when the kernels loaded
INTERPRETED = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

# switched on by the kernel tests; the engine leaves it off
RUN_ON_CPU = False


def use_triton(x: torch.Tensor) -> bool:
    if not HAVE_TRITON:
        return False
    if x.is_cuda:
        return True
    return RUN_ON_CPU and INTERPRETED


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def jit(fn):
    """`triton.jit` where triton is installed; elsewhere the kernel is never launched, and the
    kernel modules (which use postponed annotations) still import."""
    return triton.jit(fn) if HAVE_TRITON else fn
