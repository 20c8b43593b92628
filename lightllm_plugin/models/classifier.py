"""`*ForSequenceClassification` of the Llama family: the same model with a `score` head.

Hugging Face applies `score` (a linear layer without bias) to every hidden state and keeps the
last token's row; here it is applied to the last token's row only, which is the same number. The
language-model head is tied to the embeddings (the checkpoint has none) and costs no memory.
"""

from __future__ import annotations

import torch
from torch import nn

from lightllm_plugin.models.llama import LlamaFamilyModel
from lightllm_plugin.models.model_config import ModelConfig


class SequenceClassificationModel(LlamaFamilyModel):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__(cfg, dtype)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False, dtype=dtype)

    @torch.inference_mode()
    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] pooled hidden states -> [B, num_labels] float32 logits. The head runs in
        float32 whatever the model's dtype: it is one small matrix, and a reward is one number
        that a bfloat16 output would round to 8 bits."""
        return torch.nn.functional.linear(hidden.float(), self.score.weight.float())
