"""The radix tree and the admission rule that uses it: pure Python, no torch."""

import random

import pytest

from lightllm_plugin.engine.prefix_cache import PrefixCache, common_prefix_length
from lightllm_plugin.engine.scheduler import SchedRequest, Scheduler


def _naive_common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_common_prefix_length_equals_a_token_by_token_count():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(40))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(10))]
        assert common_prefix_length(a, b) == _naive_common(a, b)


def test_a_prefix_ending_inside_an_edge_matches_to_the_token_and_keeps_its_slots():
    cache = PrefixCache()
    node, present = cache.insert([1, 2, 3, 4, 5], [10, 11, 12, 13, 14])
    assert present == 0 and node.depth == 5 and cache.cached_slots == 5
    mid = cache.match([1, 2, 3, 9])
    assert mid.depth == 3 and mid.path_slots() == [10, 11, 12]
    assert cache.match([1, 2, 3, 4, 5, 6]).path_slots() == [10, 11, 12, 13, 14]
    assert cache.match([7]).depth == 0
    # the split changed nothing the tree owns
    assert cache.cached_slots == 5 and sorted(cache.all_slots()) == [10, 11, 12, 13, 14]


def test_insert_reports_the_tokens_already_held_and_takes_only_the_new_ones():
    cache = PrefixCache()
    cache.insert([1, 2, 3], [10, 11, 12])
    node, present = cache.insert([1, 2, 3, 4, 5], [20, 21, 22, 23, 24])
    assert present == 3
    assert node.path_slots() == [10, 11, 12, 23, 24]  # the tree keeps its own slots for 1, 2, 3
    assert cache.cached_slots == 5
    branch, present = cache.insert([1, 2, 7], [30, 31, 32])
    assert present == 2 and branch.path_slots() == [10, 11, 32]


def test_salts_keep_entries_apart():
    cache = PrefixCache()
    cache.insert([1, 2, 3], [10, 11, 12], salt="alice")
    assert cache.match([1, 2, 3], salt="bob").depth == 0
    assert cache.match([1, 2, 3]).depth == 0
    assert cache.match([1, 2, 3], salt="alice").depth == 3


def test_locked_entries_are_never_evicted_and_unlocked_leaves_go_least_recently_used_first():
    cache = PrefixCache()
    old, _ = cache.insert([1, 2, 3], [10, 11, 12])
    new, _ = cache.insert([4, 5], [20, 21])
    held, _ = cache.insert([6, 7], [30, 31])
    cache.lock(held)
    cache.lock(new)
    cache.unlock(new)  # touched after `old`: more recently used
    assert cache.locked_slots == 2 and cache.evictable_slots == 5
    assert cache.evict(1) == [10, 11, 12]  # a whole leaf goes, the oldest
    assert cache.evict(10) == [20, 21]  # fewer than asked: the locked entry stays
    assert cache.cached_slots == 2 and cache.match([6, 7]).depth == 2
    cache.unlock(held)
    assert sorted(cache.flush()) == [30, 31] and cache.cached_slots == 0


def test_locking_a_node_locks_its_ancestors_and_a_split_keeps_the_count():
    cache = PrefixCache()
    leaf, _ = cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    assert cache.unlocked_slots_above(leaf) == 4
    cache.lock(leaf)
    mid = cache.match([1, 2, 9])  # splits the locked edge
    assert mid.refs == 1 and cache.locked_slots == 4 and cache.unlocked_slots_above(mid) == 0
    other, _ = cache.insert([1, 2, 8], [20, 21, 22])
    assert cache.unlocked_slots_above(other) == 1  # only its own new token
    cache.unlock(leaf)
    assert cache.locked_slots == 0
    with pytest.raises(RuntimeError):
        cache.unlock(leaf)


def test_random_operations_keep_the_tree_consistent():
    """Against a plain dict of sequence -> slots: every slot owned once, the counts right, and
    a match never longer than the longest stored sequence it is a prefix of."""
    rng = random.Random(1)
    cache = PrefixCache()
    next_slot = 0
    locks = []
    for _ in range(400):
        op = rng.random()
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        salt = rng.choice([None, "s"])
        if op < 0.5:
            node = cache.match(tokens, salt)
            held = node.depth
            fresh = list(range(next_slot, next_slot + len(tokens) - held))
            next_slot += len(fresh)
            end, present = cache.insert(tokens, node.path_slots() + fresh, salt)
            assert present == held and end.depth == len(tokens)
            if rng.random() < 0.3:
                cache.lock(end)
                locks.append(end)
        elif op < 0.7 and locks:
            cache.unlock(locks.pop(rng.randrange(len(locks))))
        else:
            before = cache.evictable_slots
            freed = cache.evict(rng.randrange(1, 6))
            assert len(freed) <= before and cache.evictable_slots == before - len(freed)
        slots = cache.all_slots()
        assert len(slots) == len(set(slots)) == cache.cached_slots
        assert 0 <= cache.locked_slots <= cache.cached_slots
    for node in locks:
        cache.unlock(node)
    cache.flush()
    assert cache.cached_slots == cache.locked_slots == 0 and cache.all_slots() == []


# ---------------------------------------------------------------- admission with the cache


def _req(rid, prompt, max_new, salt=None):
    return SchedRequest(req_id=rid, prompt_len=len(prompt), max_new_tokens=max_new, prompt_ids=list(prompt),
                        salt=salt)


def test_a_cached_prefix_costs_nothing_at_admission_and_is_prefilled_only_from_there():
    cache = PrefixCache()
    cache.insert(list(range(90)), list(range(90)))  # 90 of a 100-slot pool, unused: evictable
    s = Scheduler(100, 1000, 8, chunked_prefill_size=None, cache=cache)
    r = _req(1, list(range(95)), 5)
    s.add(r)
    batch = s.schedule()
    assert batch.admitted == [r] and r.cached_len == 90
    assert (r.chunk_start, r.chunk_len) == (90, 5)
    assert cache.locked_slots == 90
    # a second request with another prompt needs more than the 10 slots the lock leaves
    s.add(_req(2, [500 + i for i in range(8)], 4))
    assert not s.schedule().admitted


def test_evictable_entries_count_as_free():
    cache = PrefixCache()
    cache.insert(list(range(1000, 1090)), list(range(90)))
    s = Scheduler(100, 1000, 8, cache=cache)
    s.add(_req(1, list(range(50)), 40))  # shares nothing, needs 90 of 100 slots
    assert s.schedule().admitted


def test_a_prompt_longer_than_the_chunk_is_prefilled_over_several_steps_beside_the_decodes():
    s = Scheduler(1000, 1000, 8, chunked_prefill_size=32)
    short, long_ = _req(1, [1] * 10, 50), _req(2, [2] * 100, 5)
    s.add(short)
    s.schedule()
    short.output_len = 1
    s.add(long_)
    chunks = []
    for _ in range(4):
        batch = s.schedule()
        assert batch.decode == [short]  # the running request decodes every step
        chunks += [(r.chunk_start, r.chunk_len) for r in batch.prefill]
        short.output_len += 1
    assert chunks == [(0, 32), (32, 32), (64, 32), (96, 4)]
    assert long_.prefill_done and s.all_prefilled()


def test_with_nothing_decoding_a_prompt_takes_the_whole_batch_budget_in_one_step():
    s = Scheduler(1000, 64, 8, chunked_prefill_size=16)
    first, second = _req(1, [1] * 40, 5), _req(2, [2] * 40, 5)
    s.add(first)
    s.add(second)
    batch = s.schedule()
    assert [(r.chunk_start, r.chunk_len) for r in batch.prefill] == [(0, 40), (0, 24)]
    first.output_len = 1
    batch = s.schedule()  # `first` decodes now: `second` goes on in chunks
    assert batch.decode == [first] and [(r.chunk_start, r.chunk_len) for r in batch.prefill] == [(24, 16)]


def test_without_chunking_a_prompt_over_the_batch_budget_is_refused():
    s = Scheduler(1000, 64, 8, chunked_prefill_size=None)
    with pytest.raises(ValueError, match="batch_max_tokens"):
        s.add(_req(1, [1] * 65, 5))
    Scheduler(1000, 64, 8, chunked_prefill_size=16).add(_req(1, [1] * 65, 5))


def test_a_prompt_sharing_a_prefill_in_progress_waits_for_it_then_reads_it_from_the_cache():
    cache = PrefixCache()
    s = Scheduler(1000, 1000, 8, cache=cache)
    system = list(range(100, 160))
    first, same, other = _req(1, system + [1, 2], 4), _req(2, system + [3, 4], 4), _req(3, [7, 8, 9], 4)
    for r in (first, same, other):
        s.add(r)
    batch = s.schedule()
    # `same` waits a step; `other`, behind it, shares nothing and goes ahead
    assert batch.admitted == [first, other] and s.waiting == (same,)
    cache.insert(first.prompt_ids, list(range(first.prompt_len)))  # what the core does at launch
    first.shared_len = first.prompt_len
    first.output_len = other.output_len = 1
    batch = s.schedule()
    assert batch.admitted == [same] and same.cached_len == len(system)


def test_a_different_salt_does_not_wait_for_a_prefill_it_could_not_share():
    s = Scheduler(1000, 1000, 8, cache=PrefixCache())
    a, b = _req(1, list(range(40)), 4, salt="a"), _req(2, list(range(40)), 4, salt="b")
    s.add(a)
    s.add(b)
    assert s.schedule().admitted == [a, b]


@pytest.mark.parametrize("seed", range(12))
def test_random_admission_with_a_cache_never_promises_more_slots_than_exist(seed):
    """Simulate the core's bookkeeping: slots held = cache + private, never above the pool,
    whatever mix of shared prompts, chunks and evictions; and everything completes."""
    rng = random.Random(seed)
    total = 200
    cache = PrefixCache()
    s = Scheduler(total, 64, 6, chunked_prefill_size=24, cache=cache)
    free = list(range(total))
    private: dict[int, list[int]] = {}
    reqs: dict[int, SchedRequest] = {}
    bases = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    for rid in range(50):
        prompt = rng.choice(bases)[: rng.randrange(5, 40)] + [rng.randrange(50) for _ in range(rng.randrange(1, 60))]
        reqs[rid] = r = _req(rid, prompt, rng.randrange(1, 30))
        s.add(r)
    done = set()
    for _ in range(2000):
        if len(done) == len(reqs):
            break
        batch = s.schedule()
        for r in batch.decode:
            private[r.req_id].append(_take(free, cache, 1)[0])
            r.output_len += 1
        for r in batch.prefill:
            mine = private.setdefault(r.req_id, [])
            mine.extend(_take(free, cache, r.chunk_len))
            if r.prefill_done:
                r.output_len = 1
                shared = r.cache_node.path_slots() if r.cache_node is not None else []
                node, present = cache.insert(r.prompt_ids, (shared + mine)[: r.prompt_len])
                # tokens a request of this same step inserted first: its copies are freed (adopted)
                free.extend(mine[: present - r.shared_len])
                cache.lock(node)
                if r.cache_node is not None:
                    cache.unlock(r.cache_node)
                r.cache_node, r.shared_len = node, r.prompt_len
                del mine[: r.prompt_len - r.cached_len]
        assert cache.cached_slots + sum(map(len, private.values())) + len(free) == total
        for r in list(s.running):
            if r.output_len >= r.max_new_tokens:
                s.remove(r.req_id)
                free.extend(private.pop(r.req_id))
                cache.unlock(r.cache_node)
                done.add(r.req_id)
    assert len(done) == len(reqs)


def _take(free, cache, n):
    if len(free) < n:
        free.extend(cache.evict(n - len(free)))
    assert len(free) >= n, "admission promised slots the pool does not have"
    out = free[-n:]
    del free[-n:]
    return out
