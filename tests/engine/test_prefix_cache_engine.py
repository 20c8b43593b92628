"""The prefix cache and chunked prefill in the engine: the same greedy tokens as an engine with
both off, token for token (float32), on the default model and on tiny random models; no slot
ever owned twice or lost, whatever arrives, aborts or gets evicted."""

import random

import pytest
import torch
import transformers

from lightllm_plugin.chat_template import render_chat
from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.core import EngineCore
from lightllm_plugin.models.loader import InMemoryCheckpoint
from lightllm_plugin.sampling_params import SamplingParams

NO_CACHE = {"disable_dynamic_prompt_cache": True, "disable_chunked_prefill": True}


def _default_engine(**overrides) -> EngineCore:
    cfg = EngineConfig(data_type="float32", max_total_token_num=6000, max_req_total_len=1024, max_req_input_len=700,
                       **overrides)
    return EngineCore(cfg, progress=False)


@pytest.fixture(scope="module")
def cached():
    return _default_engine()


@pytest.fixture(scope="module")
def uncached():
    return _default_engine(**NO_CACHE)


def check_slots(engine: EngineCore) -> None:
    """Every slot is exactly one of: free, the cache's, private to one live request."""
    free = engine.free_slots._free
    cache = engine.prefix_cache.all_slots() if engine.prefix_cache is not None else []
    private = [s for live in engine._live.values() for s in live.slots[live.sched.shared_len:]]
    everything = free + cache + private
    assert len(everything) == len(set(everything)) == engine.total_slots
    assert engine.used_slots == len(cache) + len(private) == engine.tokens_held()
    for live in engine._live.values():  # a request's shared prefix is the cache's slots of its prompt
        if live.sched.cache_node is not None:
            assert live.slots[: live.sched.shared_len] == live.sched.cache_node.path_slots()[: live.sched.shared_len]


def run(engine: EngineCore, requests, max_steps=3000) -> dict[int, tuple[list[int], int]]:
    """(tokens, cached_len) of each request added now, run to the end, slots checked every step."""
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    out: dict[int, tuple[list[int], int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        for ev in engine.step():
            tokens, _ = out.get(ev.req_id, ([], 0))
            out[ev.req_id] = (tokens + [ev.token_id], ev.cached_len)
        check_slots(engine)
    raise AssertionError("the engine did not finish within the step bound")


def greedy(n=12, **kw):
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def tokens_of(result):
    return {rid: toks for rid, (toks, _) in result.items()}


def test_an_eight_turn_chat_resending_its_history_gives_the_tokens_of_the_engine_without_cache(cached, uncached):
    cached.flush_cache()
    messages = [{"role": "system", "content": "You are a terse assistant who answers in one short sentence."}]
    questions = ["Name a planet.", "Name another.", "Which is larger?", "And the smallest?", "Name a moon.",
                 "Of which planet?", "How far is it?", "Thanks, goodbye."]
    previous_prompt = 0
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        _, ids = render_chat(cached.tokenizer, messages)
        with_cache = run(cached, [(turn, ids, greedy(10))])[turn]
        without = run(uncached, [(turn, ids, greedy(10))])[turn]
        assert with_cache[0] == without[0], f"turn {turn}"
        assert with_cache[1] >= previous_prompt  # at least the whole previous prompt came from the cache
        previous_prompt = len(ids)
        messages.append({"role": "assistant", "content": cached.tokenizer.decode(with_cache[0], skip_special_tokens=True)})
    assert previous_prompt > 150


def test_prompts_that_diverge_anywhere_match_as_far_as_they_agree(cached, uncached):
    cached.flush_cache()
    base = cached.tokenizer.encode("The history of the Roman Empire begins with the founding of the city, and")
    first = run(cached, [(0, base, greedy(16))])[0][0]
    x = cached.tokenizer.encode(" zebra")[0]
    variants = {
        1: ([base[0], x] + base[2:], 1),  # diverges at token 1
        2: (base[:-1] + [x], len(base) - 1),  # at the last prompt token
        3: (base + first[:7] + [x, x], len(base) + 7),  # in the middle of the previous output
        4: (base, len(base) - 1),  # the same prompt: all but its last token
    }
    reference = tokens_of(run(uncached, [(rid, ids, greedy(16)) for rid, (ids, _) in variants.items()]))
    for rid, (ids, expect_cached) in variants.items():
        toks, cached_len = run(cached, [(rid, ids, greedy(16))])[rid]
        assert toks == reference[rid], rid
        assert cached_len == expect_cached, rid


def test_identical_prompts_sent_at_once_run_one_prefill(cached, uncached):
    cached.flush_cache()
    ids = cached.tokenizer.encode("Four friends walked into a quiet library on a rainy afternoon and")
    hits = cached.cache_hit_tokens
    out = run(cached, [(rid, ids, greedy(8)) for rid in range(4)])
    reference = run(uncached, [(0, ids, greedy(8))])[0][0]
    assert all(toks == reference for toks, _ in out.values())
    # the first computes the prompt, the other three read all of it but the last token
    assert sorted(c for _, c in out.values()) == [0] + [len(ids) - 1] * 3
    assert cached.cache_hit_tokens - hits == 3 * (len(ids) - 1)


def test_a_long_prompt_in_chunks_gives_the_unchunked_tokens_and_never_stalls_a_running_stream(uncached):
    engine = _default_engine(chunked_prefill_size=32)
    stream_ids = engine.tokenizer.encode("Count slowly:")
    long_ids = engine.tokenizer.encode(" ".join(f"item {i} is a word," for i in range(40)))
    assert len(long_ids) > 5 * 32
    stream = greedy(60, ignore_eos=True)
    engine.add_request(1, stream_ids, stream)
    engine.step()
    engine.add_request(2, long_ids, greedy(12))
    steps_until_first = 0
    long_tokens: list[int] = []
    while not long_tokens:
        events = engine.step()
        check_slots(engine)
        steps_until_first += 1
        assert 1 in {e.req_id for e in events}, "the running stream missed a step"
        long_tokens = [e.token_id for e in events if e.req_id == 2]
    assert steps_until_first >= 5  # it really was chunked
    rest = run(engine, [])
    long_tokens += rest.get(2, ([], 0))[0]
    assert long_tokens == tokens_of(run(uncached, [(2, long_ids, greedy(12))]))[2]


def test_different_cache_salts_never_share_and_the_same_salt_does(cached):
    cached.flush_cache()
    ids = cached.tokenizer.encode("A secret shared only within one tenant of the service:")
    cached_len = {}
    for rid, salt in enumerate(["alice", "bob", None, "alice", "bob"]):
        cached_len[rid] = run(cached, [(rid, ids, greedy(4, cache_salt=salt))])[rid][1]
    assert cached_len == {0: 0, 1: 0, 2: 0, 3: len(ids) - 1, 4: len(ids) - 1}


# ---------------------------------------------------------------- tiny random models


def _tiny_checkpoint(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.3, architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(cfg).eval()
    return InMemoryCheckpoint(cfg.to_dict(), list(model.state_dict().items()))


def _tiny_engine(slots, **overrides):
    cfg = EngineConfig(data_type="float32", max_total_token_num=slots, max_req_total_len=128, max_req_input_len=100,
                       running_max_req_size=8, **overrides)
    return EngineCore(cfg, progress=False, with_tokenizer=False, checkpoint=_tiny_checkpoint())


@pytest.fixture(scope="module")
def tiny_reference():
    return _tiny_engine(4000, **NO_CACHE)


def _random_workload(rng, count):
    bases = [[rng.randrange(97) for _ in range(60)] for _ in range(3)]
    work = []
    for rid in range(count):
        head = rng.choice(bases)[: rng.randrange(0, 60)]
        ids = head + [rng.randrange(97) for _ in range(rng.randrange(1, 30))]
        params = greedy(rng.randrange(1, 24), ignore_eos=True, cache_salt=rng.choice([None, None, "t"]))
        work.append((rid, ids, params))
    return work


@pytest.mark.parametrize("seed", range(4))
def test_random_arrivals_aborts_and_evictions_keep_every_slot_accounted_for(seed, tiny_reference):
    """A 300-slot pool, chunks of 8, prompts sharing random prefixes, salts, aborts mid-prefill and
    mid-decode: after every step each slot is free, cached or one live request's; the requests
    that were not aborted get the tokens of the engine without cache; at the end, after a flush,
    every slot is free."""
    rng = random.Random(seed)
    engine = _tiny_engine(300, chunked_prefill_size=8)
    work = _random_workload(rng, 60)
    assert sum(len(ids) + p.max_new_tokens for _, ids, p in work) > 5 * engine.total_slots
    pending, got, aborted = list(work), {}, set()
    aborted_mid_prefill = 0
    for _ in range(5000):
        if not pending and not engine.has_unfinished():
            break
        for _ in range(rng.randrange(3)):
            if pending:
                engine.add_request(*pending.pop(0))
        live = list(engine._live.values())
        prefilling = [r for r in live if r.row >= 0 and not r.sched.prefill_done]
        if live and rng.random() < 0.1:
            victim = rng.choice(prefilling if prefilling and rng.random() < 0.5 else live)
            aborted_mid_prefill += not victim.sched.prefill_done and victim.row >= 0
            engine.abort(victim.req_id)
            aborted.add(victim.req_id)
        for ev in engine.step():
            got.setdefault(ev.req_id, []).append(ev.token_id)
        check_slots(engine)
    assert not engine.has_unfinished() and not pending
    assert aborted_mid_prefill >= 1
    expect = tokens_of(run(tiny_reference, [w for w in work if w[0] not in aborted]))
    assert {rid: toks for rid, toks in got.items() if rid not in aborted} == expect
    assert engine.cache_hit_tokens > 0
    engine.flush_cache()
    assert engine.free_slots.num_free == engine.total_slots and engine.cached_slots == 0


def test_a_pool_far_smaller_than_the_working_set_completes_every_request(tiny_reference):
    engine = _tiny_engine(200)
    rng = random.Random(5)
    work = [(rid, [rng.randrange(97) for _ in range(rng.randrange(30, 70))], greedy(30, ignore_eos=True))
            for rid in range(40)]
    assert sum(len(ids) + 30 for _, ids, _ in work) > 10 * engine.total_slots
    out = run(engine, work)
    assert tokens_of(out) == tokens_of(run(tiny_reference, work))
    assert all(len(toks) == 30 for toks, _ in out.values())


def test_int8_kv_with_the_cache_gives_the_tokens_of_int8_kv_without_it():
    with_cache = _tiny_engine(2000, kv_cache_dtype="int8", chunked_prefill_size=16)
    without = _tiny_engine(2000, kv_cache_dtype="int8", **NO_CACHE)
    rng = random.Random(9)
    work = _random_workload(rng, 16)
    got = run(with_cache, work)
    assert with_cache.cache_hit_tokens > 0
    assert tokens_of(got) == tokens_of(run(without, work))


def test_a_step_that_fails_while_a_repeated_prompt_adopts_cached_slots_leaks_none(monkeypatch):
    """A repeated prompt's last token is recomputed into a slot of its own and then read from the
    cache's copy; when the step raises, the own slot must still go back (fail_running, as the
    router calls it)."""
    engine = _tiny_engine(400)
    ids = list(range(10, 40))
    run(engine, [(1, ids, greedy(3))])

    def failing_launch(*args, **kwargs):
        raise RuntimeError("the model failed")

    monkeypatch.setattr(engine.runner, "launch", failing_launch)
    engine.add_request(2, ids, greedy(3))
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.fail_running() == [2]
    assert engine.free_slots.num_free == engine.total_slots and engine.cached_slots == 0
