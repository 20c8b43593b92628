"""Structured outputs on CUDA: the token bitmask on the GPU against the bit-by-bit reference, and
the engine with CUDA graphs and queued decode (a constrained step queues its forward ahead and
samples once the previous tokens are known) holding a random-weight model to a JSON schema,
checked token by token by a fresh xgrammar matcher and by pydantic."""

from __future__ import annotations

import json
from typing import Literal

import pydantic
import pytest
import torch
import transformers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from lightllm_plugin.engine.structured_output import apply_token_bitmask, bitmask_words  # noqa: E402

EOS = 256


@pytest.mark.parametrize("vocab", [1000, 49152, 151936])
def test_bitmask_on_cuda_matches_the_cpu_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31, (64, bitmask_words(vocab)), dtype=torch.int64, generator=gen).to(torch.int32)
    want = logits.clone()
    bits = [[(w >> j) & 1 for w in row for j in range(32)][:vocab] for row in bitmask.tolist()]
    want[~torch.tensor(bits, dtype=torch.bool)] = float("-inf")
    got = logits.cuda()
    apply_token_bitmask(got, bitmask.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


class Item(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    count: int = pydantic.Field(ge=0, le=99)
    kind: Literal["x", "y"]


def _byte_tokenizer(path) -> None:
    """A byte-level tokenizer: one token per byte and an eos, so JSON is spelled byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)} | {"<eos>": EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=EOS,
    )
    path = tmp_path_factory.mktemp("llama_bytes")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    _byte_tokenizer(path)
    return str(path)


def test_json_schema_with_cuda_graphs_queued_decode_and_sampling(model_dir):
    import xgrammar

    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.sampling_params import SamplingParams

    engine = EngineCore(EngineConfig(model_dir=model_dir, device="cuda", max_total_token_num=16384,
                                     max_req_total_len=512, max_req_input_len=256), progress=False)
    assert engine.runner.decode_graphs is not None
    schema = {"json": Item.model_json_schema()}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 100, 7, 64, 12, 33, 90)]
    params = [SamplingParams(temperature=0, max_new_tokens=64, structured_outputs=schema),
              SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=64, structured_outputs=schema),
              SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)]  # unconstrained neighbours
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params[i % 3])
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finish: dict[int, str] = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for ev in engine.step():
            out[ev.req_id].append(ev.token_id)
            if ev.finish_reason:
                finish[ev.req_id] = ev.finish_reason
    assert not engine.has_unfinished()
    assert engine.steps_queued_ahead > 0  # the constrained steps went through queued decode

    info = xgrammar.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=512, stop_token_ids=[EOS])
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(Item.model_json_schema()),
                                                                   any_whitespace=False)
    for i in range(len(prompts)):
        if i % 3 == 2:
            assert len(out[i]) == 24 and finish[i] == "length"
            continue
        matcher = xgrammar.GrammarMatcher(compiled)
        assert all(matcher.accept_token(t) for t in out[i]), out[i]
        assert finish[i] == "stop" and out[i][-1] == EOS
        Item.model_validate_json(engine.tokenizer.decode(out[i][:-1]))
    engine.flush_cache()
    assert engine.free_slots.num_free == engine.total_slots
