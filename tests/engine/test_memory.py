import pytest

from lightllm_plugin.engine.memory import SlotFreeList


def test_free_list_allocates_distinct_slots_and_takes_them_back():
    fl = SlotFreeList(10)
    a, b = fl.allocate(4), fl.allocate(6)
    assert sorted(a + b) == list(range(10)) and fl.num_free == 0
    assert not fl.can_allocate(1)
    with pytest.raises(MemoryError, match="exhausted"):
        fl.allocate(1)
    fl.free(a)
    assert fl.num_free == 4 and fl.num_used == 6 and fl.can_allocate(4)
    assert sorted(fl.allocate(4)) == sorted(a)


def test_double_free_is_caught():
    fl = SlotFreeList(3)
    s = fl.allocate(2)
    fl.free(s)
    with pytest.raises(RuntimeError, match="twice"):
        fl.free(s)


def test_empty_pool_rejected():
    with pytest.raises(ValueError):
        SlotFreeList(0)


def test_cpu_pool_is_zero_and_takes_ram_only_where_written():
    import gc

    import psutil
    import torch

    from lightllm_plugin.engine.memory import allocate_kv_pool

    me = psutil.Process()
    before = me.memory_info().rss
    # 30 layers x 64001 slots x 6 x 64 float32: LazyLLM's max_total_token_num=64000, 2.8 GiB
    pool = allocate_kv_pool(30, 64000, 3, 64, torch.float32, torch.device("cpu"))
    assert pool.shape == (30, 64001, 6, 64) and pool.is_contiguous()
    pool[:, :100] = torch.randn(30, 100, 6, 64)
    assert me.memory_info().rss - before < 256 * 2**20
    assert torch.count_nonzero(pool[:, 100:200]) == 0 and torch.count_nonzero(pool[:, -1]) == 0
    layer = pool[3]  # views keep working, and keep the memory alive
    del pool
    gc.collect()
    assert layer[:100].abs().sum() > 0 and layer[100:].abs().sum() == 0


def test_int8_pool_holds_about_twice_the_bf16_slots():
    import torch

    from lightllm_plugin.engine.memory import allocate_kv_pool, kv_bytes_per_token
    from lightllm_plugin.models.kv_cache import QuantizedKVCache

    for layers, kv_heads, head_dim in [(32, 8, 128), (30, 3, 64), (1, 1, 64)]:
        bf16 = kv_bytes_per_token(layers, kv_heads, head_dim, torch.bfloat16)
        int8 = kv_bytes_per_token(layers, kv_heads, head_dim, torch.int8)
        assert bf16 / int8 >= 1.9, (head_dim, bf16 / int8)
        pool = allocate_kv_pool(layers, 100, kv_heads, head_dim, torch.int8, torch.device("cpu"))
        assert isinstance(pool, QuantizedKVCache)
        assert pool.values.dtype == torch.int8 and pool.shape == (layers, 101, 2 * kv_heads, head_dim)
        assert pool.scales.shape == (layers, 101, 2 * kv_heads)
        # the sizing and the allocation agree, the scratch slot aside
        assert pool.nbytes() == 101 * int8
        layer = pool[0]
        assert layer.values.shape == (101, 2 * kv_heads, head_dim) and layer.scales.shape == (101, 2 * kv_heads)
        assert torch.count_nonzero(pool.values) == 0 and torch.count_nonzero(pool.scales) == 0
