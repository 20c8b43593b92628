"""Reading llama-family GGUF files: an HF-style config and HF-named, dequantized tensors.

The file is memory-mapped (models/gguf_file.py), so only the tensor being converted is ever
resident beyond the page cache. Mixture-of-experts files
(qwen2moe, qwen3moe, and llama with experts: Mixtral) store each projection of a layer's
experts as one [E, rows, cols] tensor; it is read out one expert at a time, under the names
of an HF folder's per-expert tensors, so the loader's stacked parameter is the only copy.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from typing import Any, Iterator

import numpy as np
import torch

from .gguf_file import GGUFFile, GGUFTensor

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
# llama.cpp writes Mixtral as arch "llama" with expert tensors and an expert count
_MOE_ARCHITECTURES = {"llama": "MixtralForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
                      "qwen3moe": "Qwen3MoeForCausalLM"}
# whether the chosen experts' weights are renormalized when the file does not say
# (`expert_weights_norm`): llama.cpp's graphs for these archs hard-code it
_DEFAULT_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True}
# llama.cpp's converter interleaves the Q/K rows of these archs to suit its own rope
# kernel (see `permute` in convert_hf_to_gguf.py); HF-layout rope needs them undone.
_PERMUTED_QK = {"llama", "mistral"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",  # stored as [H]; HF's is [1, H]
}
# the experts' stacked projections, yielded as HF's per-expert names
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Derived data, not parameters: llama3-style rope frequency factors are recomputed
# from the config by HF-layout models.
_SKIPPED = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# the first Mixtral files (older llama.cpp, before its stacked ffn_*_exps) hold one tensor
# per expert and projection
_PER_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")


_reader_lock = threading.Lock()
_reader_cache: dict[tuple, Any] = {}


def _reader(path: str):
    """One parsed reader per file per process.

    Loading a model reads the config and then the tensors, so the parse is shared.
    Keyed by size and mtime so a replaced file is re-read.
    """
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _reader_lock:
        reader = _reader_cache.get(key)
        if reader is None:
            reader = GGUFFile(str(path))
            _reader_cache.clear()  # keep only the latest file mapped
            _reader_cache[key] = reader
        return reader


def _metadata(reader: GGUFFile) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in reader.metadata.items():
        # The vocabulary arrays are huge and irrelevant to the model config.
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "token_type", "merges", "scores")):
            continue
        out[key] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


def _architecture(meta: dict[str, Any], path: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {path}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}")
    return arch


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "type": kind}
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if factor is not None:
        scaling["factor"] = float(factor)
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    attn_factor = meta.get(f"{arch}.rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = float(attn_factor)
    return scaling


def gguf_model_config(path: str) -> dict[str, Any]:
    """An HF ``config.json``-like dict for a llama-family GGUF file."""
    reader = _reader(path)
    meta = _metadata(reader)
    arch = _architecture(meta, path)
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"GGUF file {path} lacks required metadata {full!r}")
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    # key_length is explicit when head_dim != hidden/heads (e.g. Qwen3).
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        # GGUF dims are innermost-first: token_embd is [hidden, vocab].
        vocab = int(tensors["token_embd.weight"].shape[-1])

    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        # an all-experts file may leave out the dense width
        "intermediate_size": int(meta.get(f"{arch}.feed_forward_length") or meta.get(f"{arch}.expert_feed_forward_length")
                                 or need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    rope_scaling = _rope_scaling(meta, arch)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    config.update(_moe_config(meta, arch, config, path))
    if "rope_freqs.weight" in tensors:
        # llama3-style rope: the file carries the per-frequency divisors themselves
        # rather than the parameters that produced them
        config["rope_freq_factors"] = [float(x) for x in _to_numpy(tensors["rope_freqs.weight"]).reshape(-1)]
    return config


def _moe_config(meta: dict[str, Any], arch: str, config: dict, path: str) -> dict[str, Any]:
    """The expert fields of an HF config of the family (empty for a dense file)."""
    experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    if arch not in _MOE_ARCHITECTURES or (arch == "llama" and not experts):
        return {}
    if not experts:
        raise ValueError(f"GGUF file {path} lacks required metadata {arch + '.expert_count'!r}")
    used = meta.get(f"{arch}.expert_used_count")
    if used is None:
        raise ValueError(f"GGUF file {path} lacks required metadata {arch + '.expert_used_count'!r}")
    width = int(meta.get(f"{arch}.expert_feed_forward_length", 0) or config["intermediate_size"])
    norm = bool(meta.get(f"{arch}.expert_weights_norm", _DEFAULT_NORM_TOPK[arch]))
    out: dict[str, Any] = {"architectures": [_MOE_ARCHITECTURES[arch]], "num_experts_per_tok": int(used)}
    if arch == "llama":  # Mixtral: every layer sparse, its experts as wide as intermediate_size
        if not norm:
            raise ValueError(f"GGUF file {path}: a llama-arch MoE without renormalized top-k is not Mixtral")
        out.update(num_local_experts=experts, intermediate_size=width)
        return out
    # every block sparse: llama.cpp's graphs for these archs have no dense blocks (gguf's tensor
    # table lists no ffn_gate/ffn_up/ffn_down for them), so mlp_only_layers cannot be written
    out.update(num_experts=experts, moe_intermediate_size=width, norm_topk_prob=norm, decoder_sparse_step=1,
               shared_expert_intermediate_size=int(meta.get(f"{arch}.expert_shared_feed_forward_length", 0) or 0))
    return out


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name in _SKIPPED:
        return None
    m = _PER_EXPERT_RE.match(name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _EXPERT_NAMES and m.group(3) == "weight":
        return f"model.layers.{m.group(1)}.mlp.experts.{{expert}}.{_EXPERT_NAMES[m.group(2)]}.weight"
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {name!r} has no known HF counterpart")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Inverse of llama.cpp's reshape(n, 2, d/2) -> swap: rows go from
    # [re0, im0, re1, im1, ...] per head back to [re..., im...] (rotate-half layout).
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _to_numpy(t: GGUFTensor, data=None) -> np.ndarray:
    """The tensor's values as float32 (or its float type): `data` is a leading-index slice of
    `t.data` (one expert's rows) when only that part is wanted."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = t.data if data is None else data
    if t.tensor_type == GGMLQuantizationType.F32:
        return data
    # quantization blocks run along the innermost dim, so any leading slice dequantizes alone
    return dequantize(data, t.tensor_type)


def _bytes_as_torch(data: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # a view of the read-only map: torch warns that it cannot be written, and it never is
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data)


def _dequantized(t: GGUFTensor, data: np.ndarray) -> torch.Tensor | np.ndarray:
    """float32 values of quantized rows. The default model's types (Q4_1, Q8_0) are unpacked by
    torch ops, bit for bit as gguf's numpy code (which splits rows into groups in Python and
    took about 1.3 s of each start of the default model, against 0.35 s here); others go to
    gguf. Blocks, per the GGUF spec: Q4_1 = f16 scale d, f16 min m, 16 bytes holding 32 4-bit
    q (low nibbles first), x = q * d + m; Q8_0 = f16 scale d, 32 int8 q, x = q * d."""
    from gguf import GGMLQuantizationType

    if t.tensor_type not in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        return _to_numpy(t, data)
    q4 = t.tensor_type == GGMLQuantizationType.Q4_1
    blocks = _bytes_as_torch(data).reshape(-1, 20 if q4 else 34)
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    if q4:
        packed = blocks[:, 4:]
        values = torch.cat([packed & 0xF, packed >> 4], dim=1).float() * scale
        values += blocks[:, 2:4].contiguous().view(torch.float16).float()
    else:
        values = blocks[:, 2:].contiguous().view(torch.int8).float() * scale
    return values.reshape(*data.shape[:-1], -1)


def _is_experts(name: str) -> bool:
    m = _BLOCK_RE.match(name)
    return m is not None and m.group(2) in _EXPERT_NAMES


def gguf_tensor_count(path: str) -> int:
    """How many tensors iter_gguf_tensors will yield (for a progress bar)."""
    return sum(int(t.shape[-1]) if _is_experts(t.name) else 1 for t in _reader(path).tensors if t.name not in _SKIPPED)


def _as_tensor(t: GGUFTensor, expected: tuple[int, ...], dtype: torch.dtype, data: np.ndarray | None = None
               ) -> torch.Tensor:
    values = _dequantized(t, t.data if data is None else data)
    if isinstance(values, torch.Tensor):
        return values.reshape(expected).to(dtype)
    if tuple(values.shape) != expected:
        values = values.reshape(expected)
    if values.flags.writeable:
        # A fresh dequantized buffer: wrap it, converting only if dtype differs.
        return torch.from_numpy(values).to(dtype)
    # A view of the read-only mmap: copy out once, straight into dtype.
    return torch.tensor(values, dtype=dtype)


def iter_gguf_tensors(path: str, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` one at a time, dequantized to ``dtype``.

    Tensors come out in HF orientation ([out, in] for linear weights). The tied
    ``lm_head.weight`` is not yielded when the file has no ``output.weight``. A stacked
    experts tensor comes out one expert at a time (``mlp.experts.<e>.<proj>.weight``).
    """
    reader = _reader(path)
    meta = _metadata(reader)
    arch = _architecture(meta, path)
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    permuted = arch in _PERMUTED_QK

    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        # numpy order is the reverse of GGUF's dims, i.e. already [out, in].
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if _is_experts(t.name):
            for expert in range(expected[0]):
                yield name.format(expert=expert), _as_tensor(t, expected[1:], dtype, t.data[expert])
            continue
        if name.endswith("shared_expert_gate.weight") and len(expected) == 1:
            expected = (1, *expected)
        tensor = _as_tensor(t, expected, dtype)
        if permuted and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            tensor = _unpermute(tensor, heads)
        elif permuted and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            tensor = _unpermute(tensor, kv_heads)
        yield name, tensor
