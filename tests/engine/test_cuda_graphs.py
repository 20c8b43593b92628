"""The CUDA-graph batch ladder (pure python); the graphs themselves are tested in tests/gpu/."""

import pytest

from lightllm_plugin.engine.cuda_graphs import graph_batch_sizes, padded_size


@pytest.mark.parametrize(
    "cap, sizes",
    [
        (1, [1]),
        (33, [1, 2, 4, 8, 16, 32, 33]),
        (64, [1, 2, 4, 8, 16, 32, 64]),
        (256, [1, 2, 4, 8, 16, 32, 64, 128, 256]),
        (1000, [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1000]),
        (4096, [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]),
    ],
)
def test_ladder_is_capped_at_the_running_batch(cap, sizes):
    assert graph_batch_sizes(cap) == sizes


def test_a_batch_is_padded_to_the_next_captured_size():
    sizes = graph_batch_sizes(256)
    assert [padded_size(sizes, b) for b in (1, 2, 3, 5, 33, 128, 129, 256)] == [1, 2, 4, 8, 64, 128, 256, 256]
    assert padded_size(sizes, 257) is None
    assert [padded_size(graph_batch_sizes(1024), b) for b in (257, 500, 1024)] == [384, 512, 1024]
