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
