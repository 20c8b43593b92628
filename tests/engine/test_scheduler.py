import random

import pytest

from lightllm_plugin.engine.scheduler import (
    ScheduledBatch,
    Scheduler,
    SchedRequest,
    peak_token_need,
)


def req(rid, prompt, max_new, out=0):
    return SchedRequest(req_id=rid, prompt_len=prompt, max_new_tokens=max_new, output_len=out)


def reqs_from(a, b):
    # output_len 0, so a = prompt_len and b = max_new_tokens
    return [req(i, ai, bi) for i, (ai, bi) in enumerate(zip(a, b))]


# ---------------------------------------------------------------- peak_token_need


def test_peak_example_from_brief():
    # sorted by b desc: (b=8,a=5), (b=4,a=10), (b=1,a=3)
    # max(8*1+5, 4*2+(5+10), 1*3+(5+10+3)) = max(13, 23, 21) = 23
    assert peak_token_need(reqs_from([10, 5, 3], [4, 8, 1])) == 23


def test_peak_single_and_empty():
    assert peak_token_need([req(0, 7, 5)]) == 12  # 5*1 + 7
    assert peak_token_need([]) == 0


def test_peak_uses_held_and_remaining():
    # a = 4 + 3 = 7, b = 10 - 3 = 7 -> 7*1 + 7 = 14
    assert peak_token_need([req(0, 4, 10, out=3)]) == 14
    assert Scheduler.peak_token_need([req(0, 4, 10, out=3)]) == 14


def test_peak_ties_order_independent():
    # all b=5: max(5*1+2, 5*2+(2+3), 5*3+(2+3+4)) = max(7, 15, 24) = 24
    for a in ([2, 3, 4], [4, 3, 2], [3, 4, 2]):
        assert peak_token_need(reqs_from(a, [5, 5, 5])) == 24
    # b=[6,6,1], a=[1,9,20]: max(6*1+1, 6*2+10, 1*3+30) = max(7, 22, 33) = 33
    assert peak_token_need(reqs_from([9, 1, 20], [6, 6, 1])) == 33


def test_peak_dominated_by_long_tail():
    # (b=100,a=1), (b=1,a=50): max(100+1, 2+51) = 101
    assert peak_token_need(reqs_from([50, 1], [1, 100])) == 101


# ---------------------------------------------------------------- admission


def test_empty_scheduler_empty_batch():
    s = Scheduler(100, 100, 10)
    b = s.schedule()
    assert isinstance(b, ScheduledBatch)
    assert b.is_empty() and b.num_tokens == 0
    assert s.num_waiting == 0 and s.num_running == 0


def test_exact_fit_admitted_one_short_waits_then_admitted_after_remove():
    s = Scheduler(total_slots=30, batch_max_tokens=100, running_max_req_size=10)
    s.add(req(1, 10, 5))  # peak alone: 5+10 = 15
    s.add(req(2, 10, 5))  # both: max(5+10, 5*2+20) = 30 == total -> fits exactly
    b = s.schedule()
    assert [r.req_id for r in b.prefill] == [1, 2]
    assert s.num_running == 2

    s2 = Scheduler(total_slots=29, batch_max_tokens=100, running_max_req_size=10)
    s2.add(req(1, 10, 5))
    s2.add(req(2, 10, 5))  # needs 30 > 29
    b = s2.schedule()
    assert [r.req_id for r in b.prefill] == [1]
    assert [r.req_id for r in s2.waiting] == [2]
    b.prefill[0].output_len += 1
    b = s2.schedule()  # running now (a=11, b=4) + cand (10, 5): max(5+10, 4*2+21) = 29
    assert [r.req_id for r in b.prefill] == [2]


def test_readmits_after_remove():
    s = Scheduler(total_slots=20, batch_max_tokens=100, running_max_req_size=10)
    s.add(req(1, 10, 10))  # 20: pool full
    s.add(req(2, 5, 5))
    assert [r.req_id for r in s.schedule().prefill] == [1]
    assert s.schedule().prefill == []
    assert s.remove(1).req_id == 1
    b = s.schedule()
    assert [r.req_id for r in b.prefill] == [2] and b.decode == []


def test_fcfs_head_blocks_smaller():
    s = Scheduler(total_slots=50, batch_max_tokens=100, running_max_req_size=10)
    s.add(req(1, 20, 10))  # 30
    s.add(req(2, 15, 10))  # with 1: max(10+20, 20+35) = 55 > 50
    s.add(req(3, 1, 1))  # would fit on its own next to 1, but must not jump ahead
    b = s.schedule()
    assert [r.req_id for r in b.prefill] == [1]
    assert [r.req_id for r in s.waiting] == [2, 3]
    for _ in range(5):
        b = s.schedule()
        assert b.prefill == []
        for r in b.decode:
            r.output_len += 1
    s.remove(1)
    assert [r.req_id for r in s.schedule().prefill] == [2, 3]


def test_batch_max_tokens_stops_admission():
    s = Scheduler(total_slots=1000, batch_max_tokens=20, running_max_req_size=10)
    s.add(req(1, 8, 1))
    s.add(req(2, 8, 1))
    s.add(req(3, 8, 1))  # 24 > 20
    b = s.schedule()
    assert [r.req_id for r in b.prefill] == [1, 2]
    assert b.num_tokens == 16
    b = s.schedule()  # 2 decode tokens + 8 = 10
    assert [r.req_id for r in b.prefill] == [3]
    assert b.num_tokens == 10


def test_batch_max_tokens_counts_decode():
    s = Scheduler(total_slots=1000, batch_max_tokens=10, running_max_req_size=10)
    s.add(req(1, 5, 50))
    s.add(req(2, 5, 50))
    s.schedule()
    s.add(req(3, 9, 1))  # 2 decode + 9 = 11 > 10
    b = s.schedule()
    assert b.prefill == [] and len(b.decode) == 2


def test_running_max_req_size_stops_admission():
    s = Scheduler(total_slots=1000, batch_max_tokens=1000, running_max_req_size=2)
    for i in range(4):
        s.add(req(i, 1, 1))
    assert [r.req_id for r in s.schedule().prefill] == [0, 1]
    assert s.schedule().prefill == []
    s.remove(0)
    assert [r.req_id for r in s.schedule().prefill] == [2]


def test_decode_has_all_running_prefill_only_first_step():
    s = Scheduler(total_slots=1000, batch_max_tokens=1000, running_max_req_size=10)
    s.add(req(1, 3, 5))
    b1 = s.schedule()
    assert [r.req_id for r in b1.prefill] == [1] and b1.decode == []
    s.add(req(2, 4, 5))
    b2 = s.schedule()
    assert [r.req_id for r in b2.prefill] == [2]
    assert [r.req_id for r in b2.decode] == [1]
    assert b2.num_tokens == 4 + 1
    b3 = s.schedule()
    assert b3.prefill == []
    assert sorted(r.req_id for r in b3.decode) == [1, 2]
    assert {r.req_id for r in s.running} == {1, 2}


def test_remove_waiting_running_unknown_and_duplicate():
    s = Scheduler(total_slots=10, batch_max_tokens=100, running_max_req_size=10)
    s.add(req(1, 5, 5))
    s.add(req(2, 5, 5))
    with pytest.raises(ValueError, match="duplicate"):
        s.add(req(1, 1, 1))
    s.schedule()
    assert s.num_running == 1 and s.num_waiting == 1
    assert s.remove(2).req_id == 2  # from waiting
    assert s.num_waiting == 0
    assert s.remove(1).req_id == 1  # from running
    assert s.num_running == 0
    assert s.remove(1) is None
    assert s.remove(42) is None
    s.add(req(1, 2, 2))  # id free again once removed


def test_arrival_is_monotonic():
    s = Scheduler(100, 100, 10)
    rs = [req(i, 1, 1) for i in (5, 3, 9)]
    for r in rs:
        s.add(r)
    assert [r.arrival for r in rs] == sorted(r.arrival for r in rs)
    assert len({r.arrival for r in rs}) == 3


def test_add_rejects_unrunnable():
    s = Scheduler(total_slots=100, batch_max_tokens=16, running_max_req_size=4)
    with pytest.raises(ValueError, match="batch_max_tokens"):
        s.add(req(1, 17, 1))
    with pytest.raises(ValueError, match="total_slots"):
        s.add(req(2, 10, 91))
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.add(req(3, 4, 0))
    assert s.num_waiting == 0
    s.add(req(1, 16, 84))  # both limits met exactly


# ---------------------------------------------------------------- simulation


@pytest.mark.parametrize("seed", range(20))
def test_random_simulation_never_ooms_and_drains(seed):
    rng = random.Random(seed)
    total = rng.randint(64, 512)
    bmt = rng.randint(16, 256)
    rmax = rng.randint(1, 24)
    s = Scheduler(total, bmt, rmax)
    n_requests = 60
    next_id = 0
    finished = set()
    max_steps = 20000
    for _step in range(max_steps):
        if next_id < n_requests and rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                if next_id >= n_requests:
                    break
                prompt = rng.randint(1, min(bmt, total - 1))
                max_new = rng.randint(1, min(total - prompt, 80))
                s.add(req(next_id, prompt, max_new))
                next_id += 1
        b = s.schedule()
        assert b.num_tokens <= bmt or not b.prefill
        assert s.num_running <= rmax
        stepped = b.prefill + b.decode
        assert {r.req_id for r in stepped} == {r.req_id for r in s.running}
        for r in stepped:
            r.output_len += 1
        # Holdings right after the step, before anything is freed: the worst moment.
        assert sum(r.prompt_len + r.output_len for r in s.running) <= total
        for r in list(s.running):
            if r.output_len >= r.max_new_tokens or rng.random() < 0.03:
                assert s.remove(r.req_id) is r
                finished.add(r.req_id)
        if next_id == n_requests and s.num_waiting == 0 and s.num_running == 0:
            break
    else:
        pytest.fail("simulation did not drain")
    assert finished == set(range(n_requests))
