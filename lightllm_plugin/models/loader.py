"""Build a model on the `meta` device and fill it from safetensors or GGUF.

Each checkpoint tensor is read once, converted to the target dtype and assigned in
place of its meta parameter, so no second full copy of the weights ever exists.
q/k/v and gate/up are fused as they arrive; only one layer's pieces wait at a time.

The model class comes from the built-in table (models/registry.py) and from what third-party
plugins declare through `register_models`: `registered_models()` loads those once per model load,
or the caller hands the table over as `models=`. The built-in plugins are not loaded here, so a
process that only runs the model (the router, a tensor-parallel rank, the offline `LLM`) never
imports the HTTP stack or an adapter.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from glob import glob
from typing import Any

import torch
from tqdm import tqdm

from lightllm_plugin.models.llama import LlamaFamilyModel
from lightllm_plugin.models.model_config import ModelConfig
from lightllm_plugin.models.tensor_parallel import (
    TPGroup,
    install_parallel_modules,
    plan_shard,
    shard_model_config,
    shard_tensors,
)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# checkpoint names -> (our name, fused piece index) for the fused projections
_FUSED = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "mlp.gate_proj": ("gate_up_proj", 0),
    "mlp.up_proj": ("gate_up_proj", 1),
    "mlp.shared_expert.gate_proj": ("moe.shared_gate_up", 0),
    "mlp.shared_expert.up_proj": ("moe.shared_gate_up", 1),
}
# mixture-of-experts checkpoints: one tensor per expert and projection, stacked into the layer's
# [E, 2I, H] gate_up and [E, H, I] down as they arrive (Mixtral names gate w1, up w3, down w2)
_EXPERT_RE = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_EXPERT_PIECE = {"gate_proj": ("w_gate_up", 0), "w1": ("w_gate_up", 0), "up_proj": ("w_gate_up", 1),
                 "w3": ("w_gate_up", 1), "down_proj": ("w_down", None), "w2": ("w_down", None)}
_BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.")
# (prefix, replacement): LLaVA files name the language model language_model.model.* (older ones
# the tower vision_tower.vision_model.*); in memory transformers 5 holds model.<part>.*
_VL_RENAMES = (("model.visual.", "visual."), ("model.language_model.", "model."),
               ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."))
_VISION_PARTS = ("visual.", "vision_tower.", "multi_modal_projector.")
_RENAMED = {
    "self_attn.o_proj.weight": "o_proj.weight",
    "self_attn.o_proj.bias": "o_proj.bias",
    "mlp.down_proj.weight": "down_proj.weight",
    "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "mlp.gate.weight": "moe.router.weight",
    "block_sparse_moe.gate.weight": "moe.router.weight",
    # transformers 5 holds the experts stacked already (a state_dict handed over in memory)
    "mlp.experts.gate_up_proj": "moe.w_gate_up",
    "mlp.experts.down_proj": "moe.w_down",
    "block_sparse_moe.experts.gate_up_proj": "moe.w_gate_up",
    "block_sparse_moe.experts.down_proj": "moe.w_down",
    "mlp.shared_expert.down_proj.weight": "moe.shared_down.weight",
    "mlp.shared_expert_gate.weight": "moe.shared_expert_gate.weight",
}


def registered_models(plugins=None, skip_broken: bool = False) -> dict[str, Any]:
    """Architecture name -> model class: the built-in table, then what plugins register (a
    built-in name cannot be taken over). `plugins`: a loaded PluginManager (default: load the
    third-party plugins LIGHTLLM_PLUGINS allows, skipping a broken one when `skip_broken` or
    LIGHTLLM_PLUGINS_SKIP_BROKEN says so)."""
    from lightllm_plugin.models.registry import builtin_models
    from lightllm_plugin.plugins import collect_models, load_plugins

    models = builtin_models()
    pm = load_plugins(skip_broken=skip_broken or None, builtins=False) if plugins is None else plugins
    for architecture, model_class in collect_models(pm).items():
        models.setdefault(architecture, model_class)
    return models


def model_class_for(architecture: str, models: Mapping[str, Any]) -> Any:
    """The class registered for `architecture`; an unknown one is a ValueError that lists
    the registered architectures."""
    model_class = models.get(architecture)
    if model_class is None:
        raise ValueError(
            f"no model class is registered for architecture {architecture!r}; registered: "
            f"{', '.join(models) or '(none)'} (a plugin adds one through its register_models hook)"
        )
    return model_class


def model_config_from_hf(hf_config: dict, models: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of an HF config dict, accepting the architectures `models` registers."""
    return ModelConfig.from_hf_dict(hf_config, architectures=models)


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
        # generation_config's eos ids win: chat models list their end-of-turn token there
        if gen.get("eos_token_id") is not None:
            cfg["eos_token_id"] = gen["eos_token_id"]
    if "LlavaForConditionalGeneration" in (cfg.get("architectures") or ()):
        cfg = _with_llava_defaults(cfg)
    return cfg


def _with_llava_defaults(cfg: dict) -> dict:
    """LLaVA files leave out every field of their text and vision configs that equals the
    family's default (llava-1.5's text_config names little more than its vocabulary): filled in
    by transformers' own config classes."""
    import transformers

    given = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
    full = transformers.LlavaConfig(**given).to_dict()
    full["architectures"] = cfg["architectures"]
    if cfg.get("eos_token_id") is not None:
        full["eos_token_id"] = cfg["eos_token_id"]
    return full


def _safetensors_files(model_dir: str) -> list[str]:
    files = sorted(glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def safetensors_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for path in _safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            total += len(f.keys())
    return total


def iter_safetensors(model_dir: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in _safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(dtype)


def _assign(module: torch.nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    current = getattr(module, leaf)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"weight {dotted}: checkpoint shape {tuple(tensor.shape)} != model {tuple(current.shape)}")
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def load_weights(
    model: LlamaFamilyModel,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device,
    total: int | None = None,
    progress: bool = True,
) -> None:
    cfg = model.cfg
    pending: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
    pieces_needed = {"qkv_proj": 3, "gate_up_proj": 2, "moe.shared_gate_up": 2}
    # (layer, stacked name) -> (the stacked tensor being filled, pieces still to come)
    stacking: dict[tuple[int, str], list] = {}
    for name, tensor in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", disable=not progress):
        tensor = tensor.to(device)
        # a vision-language checkpoint: transformers 5 names the parts model.visual and
        # model.language_model in memory; saved files keep visual.* and model.*
        for old, new in _VL_RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith(_VISION_PARTS) and hasattr(model, name.split(".", 1)[0]):
            _assign(model, name, tensor)  # the tower's parameters carry the checkpoint's names
            continue
        if name.startswith(_BARE_PREFIXES):
            # a checkpoint saved from the bare decoder (sentence-transformers folders such as
            # Qwen3-Embedding) names its weights without the causal LM's "model." prefix
            name = "model." + name
        if name == "score.weight":  # the classifier head of *ForSequenceClassification
            _assign(model, name, tensor)
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            _assign(model, name.removeprefix("model."), tensor)
            continue
        if name == "model.norm.weight":
            _assign(model, "norm", tensor)
            continue
        match = _LAYER_RE.match(name)
        if not match:
            if "rotary_emb" in name:
                continue
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        layer, rest = int(match.group(1)), match.group(2)
        stem, _, kind = rest.rpartition(".")
        if stem in _FUSED:
            fused, index = _FUSED[stem]
            key = (layer, fused, kind)
            pending.setdefault(key, {})[index] = tensor
            if len(pending[key]) == pieces_needed[fused]:
                parts = pending.pop(key)
                _assign(model, f"layers.{layer}.{fused}.{kind}", torch.cat([parts[i] for i in sorted(parts)]))
        elif (expert := _EXPERT_RE.match(rest)) is not None:
            _stack_expert(model, stacking, layer, int(expert.group(1)), expert.group(2), tensor)
        elif rest in _RENAMED:
            _assign(model, f"layers.{layer}.{_RENAMED[rest]}", tensor)
        else:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
    if pending or stacking:
        raise ValueError(f"checkpoint is missing parts of fused weights: {(sorted(pending) + sorted(stacking))[:4]}")
    if cfg.tie_word_embeddings or model.lm_head.weight.is_meta:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def _stack_expert(model: LlamaFamilyModel, stacking: dict, layer: int, expert: int, projection: str,
                  tensor: torch.Tensor) -> None:
    """Copy one expert's projection into its layer's stacked tensor, which becomes the parameter
    once every expert's piece is in: the stacked tensor is the only copy that outlives the piece."""
    target, half = _EXPERT_PIECE[projection]
    moe = model.layers[layer].moe
    if moe is None:
        raise ValueError(f"layer {layer} holds experts in the checkpoint but is dense in the config")
    key = (layer, target)
    if key not in stacking:
        shape = getattr(moe, target).shape
        pieces = shape[0] * (2 if half is not None else 1)
        stacking[key] = [torch.empty(shape, dtype=tensor.dtype, device=tensor.device), pieces]
    stacked = stacking[key][0]
    rows = stacked.shape[1] // 2 if half is not None else stacked.shape[1]
    destination = stacked[expert, half * rows : (half + 1) * rows] if half is not None else stacked[expert]
    if tuple(destination.shape) != tuple(tensor.shape):
        raise ValueError(f"layer {layer} expert {expert} {projection}: checkpoint shape {tuple(tensor.shape)} "
                         f"!= model {tuple(destination.shape)}")
    destination.copy_(tensor)
    stacking[key][1] -= 1
    if not stacking[key][1]:
        _assign(model, f"layers.{layer}.moe.{target}", stacking.pop(key)[0])


def build_model(
    model_cfg: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    total: int | None = None,
    progress: bool = True,
    tp: TPGroup | None = None,
    models: Mapping[str, Any] | None = None,
) -> tuple[LlamaFamilyModel, ModelConfig]:
    """The model filled from `tensors`, and its ModelConfig. With `tp`, this rank's part of it:
    its share of heads and MLP columns (the returned config), cut from the tensors as they stream.
    The class is the one registered for `model_cfg.architecture` in `models` (default: the
    plugins' registry, loaded now); it is built as `cls(config, dtype)` on the meta device and
    filled from Llama-family checkpoint names, so a plugin's class is a LlamaFamilyModel
    subclass or has its parameter names."""
    model_class = model_class_for(model_cfg.architecture, registered_models() if models is None else models)
    local_cfg = model_cfg
    if tp is not None:
        shard = plan_shard(model_cfg, tp.rank, tp.world)
        local_cfg = shard_model_config(model_cfg, shard)
        tensors = shard_tensors(tensors, model_cfg, shard)
    with torch.device("meta"):
        model = model_class(local_cfg, dtype)
    if tp is not None:
        install_parallel_modules(model, model_cfg, shard, tp, dtype)
    load_weights(model, tensors, device, total=total, progress=progress)
    model.build_rope_cache(device, max_positions)
    return model.eval(), local_cfg


def load_model(kind: str, path: str, dtype: torch.dtype, device: torch.device, max_positions: int, progress=True,
               tp: TPGroup | None = None, models: Mapping[str, Any] | None = None):
    """Returns (model, ModelConfig) for an HF folder (kind "hf") or a GGUF file (kind "gguf");
    with `tp`, this rank's part and its config. `models`: architecture -> class (default:
    `registered_models()`, the plugins loaded once here)."""
    models = registered_models() if models is None else models
    if kind == "hf":
        model_cfg = model_config_from_hf(read_hf_config(path), models)
        tensors = iter_safetensors(path, dtype)
        total = safetensors_count(path)
    else:
        from lightllm_plugin.models.gguf import (
            gguf_model_config,
            gguf_tensor_count,
            iter_gguf_tensors,
        )

        model_cfg = model_config_from_hf(gguf_model_config(path), models)
        tensors = iter_gguf_tensors(path, dtype=dtype)
        total = gguf_tensor_count(path)
    return build_model(model_cfg, tensors, dtype, device, max(max_positions, 1), total=total, progress=progress, tp=tp,
                       models=models)


@dataclass
class InMemoryCheckpoint:
    """Weights that are already tensors, e.g. a transformers model's state_dict: benchmarks build
    random models of real shapes on the GPU and hand them over without a round trip to disk.
    Tensors of the target dtype and device are used as they are, not copied."""

    hf_config: dict  # config.json's contents (PretrainedConfig.to_dict())
    tensors: Iterable[tuple[str, torch.Tensor]]


def load_checkpoint(
    checkpoint: InMemoryCheckpoint, dtype: torch.dtype, device: torch.device, max_positions: int, progress=True,
    tp: TPGroup | None = None,
    models: Mapping[str, Any] | None = None,
):
    models = registered_models() if models is None else models
    model_cfg = model_config_from_hf(checkpoint.hf_config, models)
    tensors = ((name, t.to(dtype)) for name, t in checkpoint.tensors)
    return build_model(model_cfg, tensors, dtype, device, max(max_positions, 1), progress=progress, tp=tp,
                       models=models)
