"""The offline API on the default model, checked against Hugging Face transformers."""


import pytest
import torch
import transformers

from lightllm_plugin import LLM, SamplingParams

CHATS = [
    "What is the capital of France?",
    "Hi",
    "Write a haiku about the sea.",
    "List three colours.",
    "Explain in one sentence why the sky is blue, and then explain what a rainbow is, "
    "and finally say something about sunsets over the ocean in the evening.",
    "2+2=",
    "Translate 'good morning' into Spanish.",
    "Who wrote Hamlet? Answer briefly, please, and mention the century in which it was written.",
]


@pytest.fixture(scope="module")
def llm():
    # float32: the checks below are against HF's float32 tokens and logprobs
    return LLM(data_type="float32", max_total_token_num=6000, max_req_total_len=1024, max_req_input_len=512,
               progress=False)


@pytest.fixture(scope="module")
def hf_model(hf_default_model):
    return hf_default_model


def _chat_ids(llm, text):
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return llm.tokenizer.encode(prompt, add_special_tokens=False)


@pytest.mark.slow
def test_greedy_batch_matches_hf_generate(llm, hf_model):
    prompts = [_chat_ids(llm, c) for c in CHATS]
    assert len({len(p) for p in prompts}) >= 6  # different lengths really
    # min_new_tokens masks eos on both sides, so 32 tokens always come back
    params = SamplingParams(temperature=0, max_new_tokens=32, min_new_tokens=32)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32, attention_mask=torch.ones(1, len(ids), dtype=torch.long)
            )[0, len(ids) :].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_new_tokens=24), use_tqdm=False)
    completion = out[0].outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason in ("stop", "length")


def test_logprobs_match_hf_distribution(llm, hf_model):
    ids = _chat_ids(llm, "Name a fruit.")
    out = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=1, logprobs=5), use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    top_lp, top_ids = ref.topk(5)
    entry = out.logprobs[0]
    assert set(entry) == set(top_ids.tolist())
    for tid, lp in zip(top_ids.tolist(), top_lp.tolist()):
        assert abs(entry[tid] - lp) < 1e-3
    assert out.cumulative_logprob == pytest.approx(entry[out.token_ids[0]])


@pytest.mark.slow
def test_repetition_penalty_matches_hf(llm, hf_model):
    ids = _chat_ids(llm, "Repeat the word 'cat' many times.")
    out = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.5), use_tqdm=False)
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.5,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids) :].tolist()
    assert out[0].outputs[0].token_ids == ref


@pytest.mark.slow
def test_seed_gives_same_output_whatever_the_batch(llm):
    ids = _chat_ids(llm, "Tell me a story about a dragon.")
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([ids], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [_chat_ids(llm, c) for c in CHATS[:4]]
    noisy = SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True)
    batch = llm.generate(others + [ids], [noisy] * 4 + [seeded], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone
    other_seed = llm.generate([ids], SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=99, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_and_stop_controls(llm):
    ids = _chat_ids(llm, "Say something.")
    outs = llm.generate([ids], SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7, ignore_eos=True), use_tqdm=False)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1

    greedy = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_id = greedy.token_ids[3]
    stopped = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    first = greedy.token_ids.index(stop_id)
    assert stopped.token_ids == greedy.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id

    # a stop string cuts the text right before it
    word = greedy.text.split()[2]
    cut = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=12, stop=[word]), use_tqdm=False)[0].outputs[0]
    assert cut.text == greedy.text[: greedy.text.index(word)]
    assert cut.finish_reason == "stop" and cut.stop_reason == word


def test_eos_stops_unless_ignored(llm):
    ids = _chat_ids(llm, "What is the capital of France?")
    out = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=200), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.config.resolved_eos_ids
    n = len(out.token_ids)
    longer = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=n + 5, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) == n + 5 and longer.finish_reason == "length"
    at_least = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=n + 5, min_new_tokens=n + 2), use_tqdm=False)[0].outputs[0]
    assert len(at_least.token_ids) >= n + 2
    assert all(t not in llm.config.resolved_eos_ids for t in at_least.token_ids[: n + 1])


def test_sampling_filters_restrict_choices(llm):
    ids = _chat_ids(llm, "Pick a number.")
    greedy = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    for params in (
        SamplingParams(temperature=1.5, top_k=1, max_new_tokens=6, ignore_eos=True, seed=1),
        SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=6, ignore_eos=True, seed=2),
        SamplingParams(temperature=1.5, min_p=1.0, max_new_tokens=6, ignore_eos=True, seed=3),
    ):
        assert llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids == greedy.token_ids


def test_bad_input_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="max_req_input_len"):
        llm.generate([[5] * 600], SamplingParams(max_new_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="max_req_total_len"):
        llm.generate(["hello"], SamplingParams(max_new_tokens=1024), use_tqdm=False)
    assert llm.engine.used_slots == llm.engine.cached_slots and not llm.engine.has_unfinished()


def test_unknown_model_path_and_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        LLM("/no/such/model", progress=False)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path), progress=False)


def test_the_samples_of_a_seed_at_the_top_of_the_range_get_the_wrapped_seeds_the_server_gives(llm):
    """LLM and the server's tokenizer process derive sample seeds with one function
    (SamplingParams.for_sample): sample 1 of seed 2**63-1 is the request seeded -2**63."""
    ids = _chat_ids(llm, "Tell me a story.")
    params = dict(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    both = llm.generate([ids], SamplingParams(n=2, seed=2**63 - 1, **params), use_tqdm=False)[0].outputs
    wrapped = llm.generate([ids], SamplingParams(seed=-(2**63), **params), use_tqdm=False)[0].outputs[0]
    assert both[1].token_ids == wrapped.token_ids


def test_the_samples_of_one_prompt_share_its_prefill_and_report_their_cached_tokens(llm):
    llm.engine.flush_cache()
    ids = llm.tokenizer.encode("Three short ideas for a rainy weekend, as a numbered list:")
    hits = llm.engine.cache_hit_tokens
    [out] = llm.generate([ids], SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=6), use_tqdm=False)
    # one prefill: samples 1..3 read all of the prompt but its last token from the cache
    assert [o.num_cached_tokens for o in out.outputs] == [0] + [len(ids) - 1] * 3
    assert out.num_cached_tokens == 0 and llm.engine.cache_hit_tokens - hits == 3 * (len(ids) - 1)
    [again] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert again.num_cached_tokens == len(ids) - 1
