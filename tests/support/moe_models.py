"""Random-weight MoE models for the comparisons against Hugging Face transformers."""

import torch
import transformers


def random_moe_model(config):
    """transformers' model of `config`, seeded, with norms and biases moved off their init and
    decisive router weights."""
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in hf_model.named_parameters():
            if "norm" in pname or "bias" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            elif pname.endswith("mlp.gate.weight") or "shared_expert_gate" in pname:
                # decisive routing: near-tied experts would let 1e-7 of rounding pick another expert
                p.copy_(torch.randn_like(p) * 0.5)
    return hf_model
