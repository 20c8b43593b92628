"""A tiny Qwen3-MoE folder served through /v1/chat/completions answers with Hugging Face
transformers' own greedy continuation of the chat."""

import os

import httpx
import pytest
import torch
import transformers
from support.model_plugin import build_tiny_checkpoint

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("qwen3moe"), "Qwen3MoeForCausalLM", family="Qwen3Moe",
                                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)


@pytest.mark.slow
def test_chat_completion_is_hf_greedy_continuation(tiny_moe, launch_server):
    server = launch_server("--model_dir", tiny_moe, "--data_type", "float32")
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": os.path.basename(tiny_moe), "messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    reply = response.json()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_moe)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
    assert out.numel() > 1  # a real continuation, not an immediate eos
    assert reply["usage"]["prompt_tokens"] == prompt.shape[1]
    assert reply["usage"]["completion_tokens"] == out.numel()
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(out, skip_special_tokens=True)
