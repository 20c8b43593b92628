"""Continuous batching and token-granular memory on the default model."""

import pytest

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.core import EngineCore
from lightllm_plugin.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)


def _run_to_end(engine: EngineCore, max_steps: int = 2000) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for ev in engine.step():
            tokens.setdefault(ev.req_id, []).append(ev.token_id)
        # zero waste: slots in use are exactly the tokens live requests hold
        assert engine.used_slots == engine.tokens_held() <= engine.total_slots
    raise AssertionError("engine did not finish within the step bound")


@pytest.fixture(scope="module")
def engine():
    # float32: joining a batch must not change a request's tokens, which holds to the bit in float32
    cfg = EngineConfig(data_type="float32", max_total_token_num=4000, max_req_total_len=512, max_req_input_len=256)
    return EngineCore(cfg, progress=False)


def _ids(engine, text):
    return engine.tokenizer.encode(text)


def test_runtime_values_written_back(engine):
    assert engine.config.total_slots == 4000 == engine.total_slots
    assert 2 in engine.config.resolved_eos_ids
    assert engine.config.resolved_device == "cpu" and engine.config.resolved_dtype == "float32"
    # CPU never captures CUDA graphs, whatever enforce_eager says
    assert not engine.config.enforce_eager and engine.runner.decode_graphs is None


def test_request_joining_mid_decode_matches_running_alone(engine):
    a, b, late = _ids(engine, "The history of Rome"), _ids(engine, "A recipe for bread:"), _ids(engine, "Once upon a time")
    engine.add_request(1, late, GREEDY)
    alone = _run_to_end(engine)[1]

    engine.add_request(2, a, GREEDY)
    engine.add_request(3, b, GREEDY)
    seen: dict[int, list[int]] = {}
    for _ in range(5):
        for ev in engine.step():
            seen.setdefault(ev.req_id, []).append(ev.token_id)
    assert engine.num_running == 2 and len(seen[2]) == 5
    engine.add_request(4, late, GREEDY)
    step = engine.step()  # the newcomer's prefill runs in the same forward as the others' decode
    assert {ev.req_id for ev in step} == {2, 3, 4}
    for ev in step:
        seen.setdefault(ev.req_id, []).append(ev.token_id)
    for rid, toks in _run_to_end(engine).items():
        seen[rid].extend(toks)
    assert seen[4] == alone
    assert engine.used_slots == engine.cached_slots


@pytest.mark.slow
def test_pool_too_small_queues_and_completes_everything():
    cfg = EngineConfig(max_total_token_num=300, max_req_total_len=160, max_req_input_len=100, batch_max_tokens=160)
    small = EngineCore(cfg, progress=False)
    prompt = small.tokenizer.encode("Tell me about the planets of the solar system in detail, one by one.")
    params = SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True)
    for rid in range(8):
        small.add_request(rid, prompt, params)
    # 8 requests x (prompt + 60) tokens is far beyond 300 slots: most must wait
    first = small.step()
    assert 0 < len(first) < 8 and small.num_waiting > 0
    out = _run_to_end(small)
    # every request gets exactly its 60 tokens (those admitted at once got their first in `first`)
    assert len(out) == 8 and all(len(t) + (1 if rid in {e.req_id for e in first} else 0) == 60 for rid, t in out.items())
    small.flush_cache()
    assert small.free_slots.num_free == small.total_slots
    assert small.runner.req_table.num_free_rows == cfg.running_max_req_size


def test_abort_frees_slots_at_once(engine):
    engine.add_request(10, _ids(engine, "Count to one hundred:"), SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.used_slots > 0
    assert engine.abort(10)
    assert engine.used_slots == engine.cached_slots and not engine.has_unfinished()
    assert not engine.abort(10)


def test_finished_request_frees_slots_the_same_step(engine):
    engine.add_request(20, _ids(engine, "Hello"), SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    events = engine.step()
    assert events[0].finish_reason == "length"
    assert engine.used_slots == engine.cached_slots


def test_duplicate_and_out_of_vocab_ids_rejected(engine):
    engine.add_request(30, [1, 2, 3], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(30, [1, 2, 3], SamplingParams(max_new_tokens=2))
    engine.abort(30)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(31, [10**7], SamplingParams(max_new_tokens=2))
    assert engine.used_slots == engine.cached_slots


def test_lengths_beyond_the_model_context_are_capped(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=300)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ec = EngineConfig(model_dir=str(tmp_path), max_req_total_len=64000, max_req_input_len=4096, max_total_token_num=64000)
    core = EngineCore(ec, progress=False, with_tokenizer=False)
    assert ec.max_req_total_len == 300 and ec.max_req_input_len == 299
    with pytest.raises(ValueError, match="max_req_input_len=299"):
        core.add_request(1, [1] * 300, SamplingParams(max_new_tokens=1))
    core.add_request(2, [1] * 290, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert len(_run_to_end(core)[2]) == 10


def test_mistral_sliding_window_caps_the_request_length(tmp_path):
    import transformers

    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                     sliding_window=200)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    ec = EngineConfig(model_dir=str(tmp_path), max_req_total_len=512, max_req_input_len=256, max_total_token_num=2048)
    EngineCore(ec, progress=False, with_tokenizer=False)
    # past the window full attention would differ from the model's own, so requests stop there
    assert ec.max_req_total_len == 200 and ec.max_req_input_len == 199
