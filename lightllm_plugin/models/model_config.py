"""ModelConfig: the shape of a Llama-family model, read from an HF config dict."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
# a vision tower before a Qwen2 language model with M-RoPE positions (models/qwen2_vl.py)
VISION_LANGUAGE_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                                 "LlavaForConditionalGeneration")  # LLaVA: models/llava.py
# a LLaVA language model's family, by its text config's model_type
_LLAVA_TEXT_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# the same families with a `score` head instead of the language-model head (reward models, classifiers)
SEQUENCE_CLASSIFICATION_ARCHITECTURES = tuple(a.replace("ForCausalLM", "ForSequenceClassification")
                                              for a in SUPPORTED_ARCHITECTURES)
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = None
    rope_freq_factors: list[float] | None = None  # GGUF llama3 files: inv_freq divisors
    sliding_window: int | None = None  # attention span when the model limits it
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE); a dense model has no sparse layers
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = False  # renormalize the chosen experts' weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert behind a sigmoid gate
    sparse_layers: tuple[int, ...] = ()  # layers whose MLP is the experts; the others are dense
    num_labels: int = 0  # outputs of the score head (*ForSequenceClassification); 0: none
    # vision-language models: the vision tower's HF config, the rotary dims given to the (time, row,
    # column) positions, and the placeholder token of an image
    vision_config: dict[str, Any] | None = None
    mrope_section: tuple[int, ...] | None = None
    image_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], architectures: Iterable[str] | None = None) -> "ModelConfig":
        """The config of `cfg` (an HF config.json dict). `architectures`: the names accepted
        (the loader passes the plugins' registry, see models/registry.py; default: the
        built-in SUPPORTED_ARCHITECTURES); the first of the checkpoint's `architectures`
        among them is the one used. Whatever the name, the fields are read as a Llama-family
        model's."""
        default = SUPPORTED_ARCHITECTURES + SEQUENCE_CLASSIFICATION_ARCHITECTURES + VISION_LANGUAGE_ARCHITECTURES
        known = tuple(default if architectures is None else architectures)
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in known), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"registered: {', '.join(known) or '(none)'}"
            )
        vision = {}
        if arch == "LlavaForConditionalGeneration":
            cfg, vision = _llava_fields(cfg)
        elif arch in VISION_LANGUAGE_ARCHITECTURES:
            cfg, vision = _vision_language_fields(cfg)
        if cfg.get("mlp_bias"):
            raise ValueError("unsupported model: mlp_bias=True")
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope_settings(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        # a classifier is its family's causal LM with another head: the same flags
        family = arch.replace("ForSequenceClassification", "ForCausalLM")
        if arch in VISION_LANGUAGE_ARCHITECTURES:
            family = vision.pop("family")
        is_qwen2 = family in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and never o_proj bias; the others follow attention_bias
            qkv_bias=attention_bias or (is_qwen2 and cfg.get("qkv_bias", True)),
            o_bias=attention_bias and not is_qwen2,
            qk_norm=family in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            rope_scaling=rope_scaling,
            rope_freq_factors=cfg.get("rope_freq_factors"),
            # Mistral configs name a window that is in force; Qwen2/3 name one and switch it off
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", family in ("MistralForCausalLM", "MixtralForCausalLM")) else None,
            eos_token_ids=_as_id_list(eos),
            bos_token_id=cfg.get("bos_token_id"),
            num_labels=_num_labels(cfg) if arch.endswith("ForSequenceClassification") else 0,
            **_moe_settings(cfg, family),
            **vision,
        )


def _vision_language_fields(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the language model's fields as a flat config, the vision fields) of a Qwen2-VL config:
    transformers 5 nests the text fields under `text_config`, older files keep them at the top,
    and name M-RoPE a rope_scaling type ("mrope") where newer ones put mrope_section in rope_parameters."""
    text = {**cfg, **(cfg.get("text_config") or {})}
    params = dict(text.get("rope_parameters") or {})
    scaling = dict(text.get("rope_scaling") or {})
    section = params.pop("mrope_section", None) or scaling.pop("mrope_section", None)
    if section is None:
        raise ValueError("a Qwen2-VL config needs mrope_section (rope_parameters or rope_scaling)")
    if scaling.get("type") == "mrope" or scaling.get("rope_type") == "mrope":
        scaling = {}
    if params.get("rope_type") == "mrope":
        params["rope_type"] = "default"
    text["rope_parameters"], text["rope_scaling"] = params or None, scaling or None
    image_token = cfg.get("image_token_id", text.get("image_token_id"))
    return text, dict(vision_config=dict(cfg["vision_config"]), mrope_section=tuple(int(s) for s in section),
                      image_token_id=image_token, family="Qwen2ForCausalLM")


def _llava_fields(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the language model's flat config, the vision fields) of a LLaVA config: the CLIP tower's
    config with the choice of feature layer and the projector's settings beside it."""
    text_cfg = cfg.get("text_config") or {}
    family = _LLAVA_TEXT_FAMILIES.get(text_cfg.get("model_type", "llama"))
    if family is None:
        raise ValueError(f"unsupported LLaVA language model {text_cfg.get('model_type')!r}; "
                         f"supported: {', '.join(_LLAVA_TEXT_FAMILIES)}")
    text = {key: value for key, value in cfg.items() if key not in ("vision_config", "text_config")}
    text.update(text_cfg)
    if isinstance(cfg.get("vision_feature_layer", -2), list):
        raise ValueError("LLaVA with several vision_feature_layer is not supported")
    vision = dict(cfg["vision_config"])
    vision.setdefault("in_channels", vision.get("num_channels", 3))
    vision.update({key: cfg[key] for key in ("vision_feature_layer", "vision_feature_select_strategy",
                                             "projector_hidden_act", "multimodal_projector_bias") if key in cfg})
    image_token = cfg.get("image_token_id")
    image_token = cfg.get("image_token_index") if image_token is None else image_token
    return text, dict(vision_config=vision, image_token_id=image_token, family=family)


def _moe_settings(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The expert fields of a MoE config, as each family names them."""
    if arch == "MixtralForCausalLM":  # every layer sparse, top-k always renormalized
        return dict(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True,
                    sparse_layers=tuple(range(cfg["num_hidden_layers"])))
    if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        return {}
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 0))
    step = cfg.get("decoder_sparse_step", 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(cfg["num_hidden_layers"]) if i not in dense and experts > 0 and (i + 1) % step == 0)
    return dict(num_experts=experts, num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["moe_intermediate_size"], norm_topk_prob=bool(cfg.get("norm_topk_prob")),
                shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
                sparse_layers=sparse)


def _num_labels(cfg: dict[str, Any]) -> int:
    id2label = cfg.get("id2label")
    return len(id2label) if id2label else int(cfg.get("num_labels", 2))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes `rope_parameters`; older configs have rope_theta + rope_scaling
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {_SUPPORTED_ROPE_TYPES}")
        if rope_type == "default":
            scaling = None
        else:
            scaling = dict(scaling, rope_type=rope_type)
    return theta, scaling
