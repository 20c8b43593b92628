"""The offline API's pooling calls (LLM.embed, .classify, .reward, .score) against transformers."""

import math

import pytest
import torch
import transformers
from support.pooling_models import HFReference, build_pooling_folder, rel_err

from lightllm_plugin import LLM

TEXTS = ["The capital of France is Paris.", "Cats sleep most of the day.", "A", "Rain is expected tomorrow " * 6]
KW = dict(max_total_token_num=2048, max_req_total_len=512, max_req_input_len=400, batch_max_tokens=48, progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooling")
    return {kind: build_pooling_folder(root / kind, kind, matryoshka=[16, 32] if "embed" in kind else None)
            for kind in ("qwen3_reward", "qwen2_classifier", "qwen3_embed_last")}


def test_reward_and_classify(folders):
    llm = LLM(folders["qwen3_reward"], **KW)
    ref = HFReference(folders["qwen3_reward"], "qwen3_reward")
    ids = [llm.tokenizer.encode(t) for t in TEXTS]
    for out, p in zip(llm.reward(TEXTS, use_tqdm=False), ids):
        assert out.prompt_token_ids == p and len(out.outputs.data) == 1
        assert rel_err(out.outputs.data, ref(p)) < 1e-4
    # a cross-encoder: the pair as the tokenizer encodes it, through a sigmoid
    scores = llm.score(TEXTS[0], TEXTS[1:], use_tqdm=False)
    for out, second in zip(scores, TEXTS[1:]):
        pair = llm.tokenizer(TEXTS[0], text_pair=second)["input_ids"]
        assert math.isclose(out.outputs.score, torch.sigmoid(ref(pair))[0].item(), rel_tol=1e-4)
    with pytest.raises(ValueError, match="--task reward"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="embedding model"):
        llm.embed("hello")

    llm = LLM(folders["qwen2_classifier"], **KW)
    ref = HFReference(folders["qwen2_classifier"], "qwen2_classifier")
    for out, text in zip(llm.classify(TEXTS, use_tqdm=False), TEXTS):
        want = torch.softmax(ref(llm.tokenizer.encode(text)), -1)
        assert out.outputs.num_classes == 3 and rel_err(out.outputs.probs, want) < 1e-4
    with pytest.raises(ValueError, match="one label"):
        llm.score("a", "b")


def test_embed_and_score(folders):
    folder = folders["qwen3_embed_last"]
    llm = LLM(folder, **KW)
    assert llm.config.resolved_task == "embed"  # from modules.json
    ref = HFReference(folder, "qwen3_embed_last")
    outs = llm.embed(TEXTS, use_tqdm=False)
    wants = [ref(llm.tokenizer.encode(t)) for t in TEXTS]
    for out, want in zip(outs, wants):
        assert len(out.outputs.embedding) == 64 and rel_err(out.outputs.embedding, want) < 1e-4
    short = llm.embed(TEXTS[0], dimensions=16, use_tqdm=False)[0].outputs.embedding
    assert rel_err(short, torch.nn.functional.normalize(wants[0][:16], dim=-1)) < 1e-4
    with pytest.raises(ValueError, match="Matryoshka dimensions"):
        llm.embed(TEXTS[0], dimensions=20)
    for out, want in zip(llm.score(TEXTS[0], TEXTS[1:], use_tqdm=False), wants[1:]):
        assert math.isclose(out.outputs.score, torch.dot(wants[0], want).item(), rel_tol=1e-4, abs_tol=1e-6)
    with pytest.raises(ValueError, match="score head"):
        llm.classify("hello")
    llm.engine.flush_cache()
    assert llm.engine.free_slots.num_free == llm.engine.total_slots


def test_generation_model_refuses_pooling_calls(tmp_path):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    from lightllm_plugin.models.tokenizer import load_tokenizer

    load_tokenizer(None).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), max_total_token_num=1024, max_req_total_len=256, max_req_input_len=128, progress=False)
    with pytest.raises(ValueError, match="needs a pooling model"):
        llm.embed([[1, 2, 3]])
