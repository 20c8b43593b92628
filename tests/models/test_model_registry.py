"""The loader takes a checkpoint's model class from the plugins' `register_models` registry:
the built-in Llama family, a plugin's architecture, and a clear error for an unknown one."""

from __future__ import annotations

import pytest
import torch
import transformers

from lightllm_plugin import plugins as P
from lightllm_plugin.models import loader
from lightllm_plugin.models.llama import LlamaFamilyModel
from lightllm_plugin.models.loader import (
    InMemoryCheckpoint,
    load_checkpoint,
    registered_models,
)
from lightllm_plugin.models.model_config import SUPPORTED_ARCHITECTURES, ModelConfig

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


class PluginLlama(LlamaFamilyModel):
    """A plugin's model class: the Llama family under another architecture name."""


class _ModelPlugin:
    @P.hookimpl
    def register_models(self, register):
        register("PluginLlamaForCausalLM", PluginLlama)


def _checkpoint(architecture: str) -> InMemoryCheckpoint:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    config = hf.config.to_dict()
    config["architectures"] = [architecture]
    return InMemoryCheckpoint(config, list(hf.state_dict().items()))


def _logits(model) -> torch.Tensor:
    from lightllm_plugin.engine.memory import allocate_kv_pool
    from lightllm_plugin.models.kv_cache import AttentionMetadata

    cfg = model.cfg
    pool = allocate_kv_pool(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
    tokens = torch.tensor([1, 5, 9, 3])
    n = tokens.numel()
    req_to_token = torch.zeros(1, 16, dtype=torch.int32)
    req_to_token[0, :n] = torch.arange(n, dtype=torch.int32)
    meta = AttentionMetadata(req_to_token=req_to_token, b_req_idx=torch.tensor([0]), b_seq_len=torch.tensor([n]),
                             b_q_start=torch.tensor([0]), b_q_len=torch.tensor([n]), out_slots=torch.arange(n))
    with torch.no_grad():
        return model(tokens, torch.arange(n), pool, meta, None)


def _without_third_party(monkeypatch):
    monkeypatch.setenv(P.ENV_PLUGINS, "")


def test_the_builtin_architectures_come_from_the_registry(monkeypatch):
    _without_third_party(monkeypatch)
    models = registered_models()
    assert set(SUPPORTED_ARCHITECTURES) <= set(models)
    assert all(models[a] is LlamaFamilyModel for a in SUPPORTED_ARCHITECTURES)


def test_from_hf_dict_accepts_the_architectures_it_is_given():
    cfg = dict(TINY, num_attention_heads=4, architectures=["PluginLlamaForCausalLM"])
    with pytest.raises(ValueError, match="unsupported architecture.*registered: LlamaForCausalLM"):
        ModelConfig.from_hf_dict(cfg)  # default: only the built-ins
    got = ModelConfig.from_hf_dict(cfg, architectures=[*SUPPORTED_ARCHITECTURES, "PluginLlamaForCausalLM"])
    assert got.architecture == "PluginLlamaForCausalLM" and got.num_kv_heads == 2


def test_a_plugin_architecture_loads_with_the_plugin_class(monkeypatch):
    """The default path: the loader loads the plugins (once for the whole load), and the
    plugin's class is built and filled; it computes what the built-in class computes."""
    _without_third_party(monkeypatch)
    calls = []
    real_load = P.load_plugins

    def load_with_the_test_plugin(*args, **kwargs):
        pm = real_load(*args, **kwargs)
        pm.add(_ModelPlugin(), P.PluginInfo("test_models", "test", "1", "_ModelPlugin"))
        calls.append(pm)
        return pm

    monkeypatch.setattr(P, "load_plugins", load_with_the_test_plugin)
    model, cfg = load_checkpoint(_checkpoint("PluginLlamaForCausalLM"), torch.float32, torch.device("cpu"), 64,
                                 progress=False)
    assert len(calls) == 1  # loaded once per model load, not per call of anything inside it
    assert type(model) is PluginLlama and cfg.architecture == "PluginLlamaForCausalLM"
    builtin, _ = load_checkpoint(_checkpoint("LlamaForCausalLM"), torch.float32, torch.device("cpu"), 64,
                                 progress=False, models=registered_models(calls[0]))
    assert type(builtin) is LlamaFamilyModel
    torch.testing.assert_close(_logits(model), _logits(builtin))


def test_an_unknown_architecture_names_the_registered_ones(monkeypatch):
    _without_third_party(monkeypatch)
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel.*registered: .*Qwen3ForCausalLM"):
        load_checkpoint(_checkpoint("GPT2LMHeadModel"), torch.float32, torch.device("cpu"), 64, progress=False)
    # a config the loader accepts but whose class is missing from the registry it is given
    cfg = ModelConfig.from_hf_dict(_checkpoint("LlamaForCausalLM").hf_config)
    with pytest.raises(ValueError, match="no model class is registered for architecture 'LlamaForCausalLM'; "
                                         "registered: PluginLlamaForCausalLM"):
        loader.model_class_for(cfg.architecture, {"PluginLlamaForCausalLM": PluginLlama})
